"""HTTP download with pooch, retrying only the failures that can pass."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Callable

from mnist_hpc.login.prefetch.errors import (
    DownloadTimeoutError,
    HashMismatchError,
    HttpError,
    NetworkError,
    PrefetchError,
    TruncatedDownloadError,
    first_line,
    hand_copy_hint,
)

_HASH_GOT = re.compile(r"but got ([0-9a-fA-F]{64})")

log = logging.getLogger("mnist_hpc.login.prefetch")


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    # pooch logs "Downloading data from ... to file <staging path>": the private staging path
    # would only confuse; we log our own line naming the final target instead.
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class _DeadlinePassed(Exception):
    """Raised inside pooch's streaming loop; not a ValueError, which pooch would take for a bad hash."""

    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


class _DeadlineFile:
    """The download's output file, refusing further chunks once the deadline has passed."""

    def __init__(self, fh: BinaryIO, deadline: float) -> None:
        self.fh, self.deadline, self.received = fh, deadline, 0

    def write(self, chunk: bytes) -> int:
        if time.monotonic() > self.deadline:
            raise _DeadlinePassed(self.received)
        self.received += len(chunk)
        return self.fh.write(chunk)

    def flush(self) -> None:
        self.fh.flush()


def _downloader(deadline: float, timeout_s: float, progress: bool) -> Callable[[str, str, Any], None]:
    """A pooch downloader whose reads time out at the per-read timeout or the deadline, if sooner."""
    import pooch

    def fetch(url: str, output_file: str, pooch_obj: Any) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlinePassed(0)
        inner = pooch.HTTPDownloader(progressbar=progress, timeout=min(timeout_s, remaining))
        with open(output_file, "w+b") as fh:
            inner(url, _DeadlineFile(fh, deadline), pooch_obj)

    return fetch


def download(
    url: str,
    staging: Path,
    fname: str,
    sha256: str,
    *,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    max_time_s: float,
    progress: bool,
) -> Path:
    """Download ``url`` into ``staging`` with pooch, retrying transient failures.

    pooch does the streaming, the hash check and the removal of a bad download. We wrap it in
    our own retry loop rather than using ``pooch.create(retry_if_failed=...)``: pooch retries
    every RequestException and ValueError alike, with a linear wait, so it would retry a 404
    or a hash mismatch (which cannot succeed) just as often as a dropped connection. Here only
    transient failures (connection errors, timeouts, truncated bodies, HTTP 5xx and 429) are
    retried, with exponential backoff, all within ``max_time_s``.

    Raises:
        NetworkError, HttpError, TruncatedDownloadError, HashMismatchError, DownloadTimeoutError.
    """
    # Imported here so that `--help` and the already-cached path do not pay for them.
    import pooch
    import requests

    deadline = time.monotonic() + max_time_s
    downloader = _downloader(deadline, timeout_s, progress)
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            with _quiet_pooch():
                return Path(
                    pooch.retrieve(
                        url, known_hash=f"sha256:{sha256}", fname=fname, path=staging, downloader=downloader
                    )
                )
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            reason = exc.response.reason if exc.response is not None else ""
            cause = f"HTTP {status} {reason}".strip()
            transient = status >= 500 or status == 429
            advice = {
                404: "check --url (the file is not there)",
                401: "the server wants credentials; download the file elsewhere and use --from",
                403: "access denied (a proxy or firewall may block it); download the file elsewhere and use --from",
            }.get(status, "try again later, use a mirror with --url, or copy the file by hand and use --from")
            error: PrefetchError = HttpError(f"{cause} from {url} ({attempt} attempt(s)); {advice}", status, url)
            error.__cause__ = exc
        except requests.exceptions.SSLError as exc:
            transient = False  # a certificate problem does not go away by itself
            cause = _reason(exc)
            error = NetworkError(
                f"TLS error talking to {url}: {cause}. If your site inspects HTTPS, point "
                f"REQUESTS_CA_BUNDLE at its CA certificate. {hand_copy_hint(url, sha256)}"
            )
            error.__cause__ = exc
        except requests.exceptions.ChunkedEncodingError as exc:
            # urllib3 enforces Content-Length: a body that ends early surfaces here.
            transient = True
            cause = _reason(exc)
            error = TruncatedDownloadError(
                f"the download from {url} was cut off before the end ({cause}; {attempt} attempt(s)). The "
                f"connection is unreliable; try again later. {hand_copy_hint(url, sha256)}"
            )
            error.__cause__ = exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            if time.monotonic() >= deadline:  # the last read's timeout was cut to the deadline
                raise _too_slow(url, sha256, max_time_s, None, attempt) from exc
            transient = True
            cause = f"timed out after {timeout_s:g} s" if isinstance(exc, requests.Timeout) else _reason(exc)
            error = NetworkError(f"cannot reach {url}: {cause} ({attempt} attempt(s)). {hand_copy_hint(url, sha256)}")
            error.__cause__ = exc
        except _DeadlinePassed as exc:
            raise _too_slow(url, sha256, max_time_s, exc.received, attempt) from None
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:  # the last read's timeout was cut to the deadline
                raise _too_slow(url, sha256, max_time_s, None, attempt) from exc
            # Malformed or unsupported URLs (no scheme, file://): retrying cannot help.
            raise PrefetchError(
                f"cannot download {url!r}: {exc}. Give an http(s) URL with --url, or a local file with --from"
            ) from exc
        except ValueError as exc:
            # pooch raises a bare ValueError on a hash mismatch, after deleting the download.
            match = _HASH_GOT.search(str(exc))
            got = match.group(1).lower() if match else None
            raise HashMismatchError(
                f"sha256 mismatch for {url}: expected {sha256}, got {got or 'another hash'}. The download "
                "was corrupted, or the server sent a different file (e.g. an error page); nothing was "
                "kept. If you use a mirror (--url) that serves a rebuilt file you trust, pass its hash "
                "with --sha256",
                expected=sha256,
                got=got,
            ) from exc
        if not transient or attempt == attempts:
            raise error
        delay_s = backoff_s * 2 ** (attempt - 1)
        if time.monotonic() + delay_s >= deadline:
            raise _too_slow(url, sha256, max_time_s, None, attempt) from error
        log.warning("attempt %d of %d for %s failed (%s); retrying in %.1f s", attempt, attempts, url, cause, delay_s)
        time.sleep(delay_s)
    raise AssertionError("unreachable: the loop returns or raises")


def _too_slow(url: str, sha256: str, max_time_s: float, received: int | None, attempts: int) -> DownloadTimeoutError:
    got = f", {received} bytes received" if received is not None else ""
    return DownloadTimeoutError(
        f"the download from {url} did not finish within --max-time-s {max_time_s:g} ({attempts} attempt(s){got}); "
        f"the connection is too slow or stalls. Try again later, or raise --max-time-s. {hand_copy_hint(url, sha256)}"
    )


def _reason(exc: BaseException) -> str:
    """The useful part of a requests error, e.g. "[Errno 111] Connection refused".

    requests nests urllib3's errors into long reprs ("HTTPConnectionPool(...): Max retries
    exceeded ... (Caused by NewConnectionError(...))"); users need only the innermost reason.
    """
    text = str(exc)
    incomplete = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text)
    if incomplete:
        return f"received {incomplete.group(1)} bytes, {incomplete.group(2)} more were announced"
    errno_reason = re.search(r"\[Errno -?\d+\] [^'\"()]+", text)
    if errno_reason:
        return errno_reason.group(0).strip()
    return first_line(exc)

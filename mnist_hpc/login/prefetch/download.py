"""HTTP download with pooch and our own streaming, bounded in size, retrying only the failures that can pass."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from mnist_hpc.login.prefetch import store
from mnist_hpc.login.prefetch.errors import (
    NO_SPACE,
    NOT_WRITABLE,
    DownloadTimeoutError,
    DownloadTooLargeError,
    HashMismatchError,
    HttpError,
    NetworkError,
    PrefetchError,
    TruncatedDownloadError,
    cache_error,
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


# Body bytes per read, as pooch's HTTPDownloader reads them: a read returns only once its chunk is
# full, and the deadline is checked between reads, so a larger chunk lets a slow server overrun it.
CHUNK_BYTES = 1024


class _Stopped(Exception):
    """Ends a download for good from inside ``pooch.retrieve``, which passes it through: it is
    neither a ValueError (taken for a bad hash) nor a RequestException (taken for a network error)."""


class _DeadlinePassed(_Stopped):
    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


class _TooLarge(_Stopped):
    def __init__(self, announced: Optional[int], received: int) -> None:
        super().__init__(announced, received)
        self.announced, self.received = announced, received


def _content_length(response: Any) -> Optional[int]:
    """The announced body size; None when absent or not a plain number (the streaming bound still holds)."""
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _close_redirect(response: Any, **kwargs: Any) -> Any:
    """A requests response hook: close a redirect unread.

    requests reads each redirect's whole body into memory before following its Location (an
    endless body never ends); a redirect needs only its headers.
    """
    if response.is_redirect:
        response.close()
    return response


class _Downloader:
    """The downloader given to ``pooch.retrieve`` (pooch's plug-in point): it streams the body itself.

    pooch's ``HTTPDownloader`` reads Content-Length only to size its progress bar and writes
    each chunk as it comes, so nothing between the headers and the body could refuse a server
    that announces more than any MNIST file; and it writes pooch's temporary file with
    mkstemp's private mode. These few lines of streaming are therefore ours; pooch keeps the
    temporary file, the sha256 check and the rename. Each read times out at the per-read
    timeout or the deadline, whichever is sooner; at most ``max_bytes`` are ever written.
    """

    def __init__(self, deadline: float, timeout_s: float, progress: bool, max_bytes: int, mode: int) -> None:
        self.deadline, self.timeout_s, self.progress = deadline, timeout_s, progress
        self.max_bytes, self.mode = max_bytes, mode
        self.announced: Optional[int] = None  # the last attempt's Content-Length

    def __call__(self, url: str, output_file: str, pooch_obj: Any) -> None:
        import requests
        from tqdm import tqdm

        self.announced = None
        os.chmod(output_file, self.mode)  # pooch made it with mkstemp's private 0600
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlinePassed(0)
        # identity: a server that honours it sends the file as it is, so Content-Length is its size. A
        # body compressed all the same is inflated by requests, and the bound counts the inflated bytes.
        with requests.get(url, stream=True, timeout=min(self.timeout_s, remaining),
                          headers={"Accept-Encoding": "identity"}, hooks={"response": _close_redirect}) as response:
            response.raise_for_status()
            self.announced = _content_length(response)
            if self.announced is not None and self.announced > self.max_bytes:
                raise _TooLarge(self.announced, 0)  # refused from the header: no body byte read
            received = 0
            with open(output_file, "wb") as fh, tqdm(total=self.announced, unit="B", unit_scale=True, ncols=79,
                                                    disable=not self.progress) as bar:
                for chunk in response.iter_content(CHUNK_BYTES):
                    if time.monotonic() > self.deadline:
                        raise _DeadlinePassed(received)
                    if received + len(chunk) > self.max_bytes:  # checked before writing: never staged
                        raise _TooLarge(self.announced, received + len(chunk))
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))


def download(
    url: str,
    staging: Path,
    fname: str,
    sha256: str,
    *,
    max_bytes: int,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    max_time_s: float,
    progress: bool,
) -> Path:
    """Download ``url`` into ``staging`` with pooch, retrying transient failures.

    ``staging`` is a staging directory inside the cache directory (:func:`store.make_staging`):
    the downloaded file is shared like the cache, and a full disk is reported as the cache's.

    pooch does the hash check and the removal of a bad download; :class:`_Downloader` streams.
    We wrap it in our own retry loop rather than using ``pooch.create(retry_if_failed=...)``:
    pooch retries every RequestException and ValueError alike, with a linear wait, so it would
    retry a 404 or a hash mismatch (which cannot succeed) just as often as a dropped
    connection. Here only transient failures (connection errors, timeouts, truncated bodies,
    HTTP 5xx and 429) are retried, with exponential backoff, all within ``max_time_s``. A body
    over ``max_bytes`` is refused from its Content-Length before any byte is read, or as soon
    as more than that has arrived; it is not retried.

    Raises:
        NetworkError, HttpError, TruncatedDownloadError, HashMismatchError, DownloadTimeoutError,
        DownloadTooLargeError, CacheNotWritableError (CacheFullError) when the staging write fails.
    """
    # Imported here so that `--help` and the already-cached path do not pay for them.
    import pooch
    import requests

    deadline = time.monotonic() + max_time_s
    downloader = _Downloader(deadline, timeout_s, progress, max_bytes, store.staged_file_mode(staging))
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
        except _TooLarge as exc:
            raise _too_large(url, max_bytes, exc.announced, exc.received) from None
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
        except OSError as exc:  # requests' errors (OSErrors too) are handled above: writing the staged file failed
            if exc.errno in NO_SPACE | NOT_WRITABLE:
                raise cache_error(exc, staging.parent, f"downloading {fname}", downloader.announced) from exc
            raise
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


def _too_large(url: str, max_bytes: int, announced: Optional[int], received: int) -> DownloadTooLargeError:
    if announced is not None and received == 0:
        what = f"the server announces {announced:,} bytes (Content-Length)"
    else:
        said = "no size" if announced is None else f"{announced:,} bytes"
        what = f"more than {max_bytes:,} bytes arrived (the server announced {said})"
    return DownloadTooLargeError(
        f"refused the download from {url}: {what}, more than any MNIST-like npz holds ({max_bytes:,} bytes at "
        "most); nothing was kept. It is not an MNIST file: check --url",
        announced, received,
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

"""Prefetch against slow, oversized and lying servers, signals, odd ``--from`` paths, imported caches and bad names.

Downloads come from the loopback server; signals are real, sent to a real prefetch process.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc.cache import (
    manifest_path,
    object_path,
    objects_dir,
    prefetch_command,
    view_target,
)
from mnist_hpc.cache import KERAS_MNIST_SHA256, KERAS_MNIST_URL
from mnist_hpc.config import ConfigError
from mnist_hpc.dataset import MAX_NPZ_BYTES
from mnist_hpc.login.prefetch import cli as prefetch_cli, fetch as prefetch_fetch
from mnist_hpc.login.prefetch import download, fetch, store
from mnist_hpc.login.prefetch.errors import DownloadTimeoutError, DownloadTooLargeError, HashMismatchError
from tests.http_fixture import LoopbackServer, Route
from tests.helpers import assert_clean, listing, make_arrays, npz_bytes, sha, subprocess_env, until

# No proxy may swallow the requests meant for the loopback server (conftest.no_proxy).
pytestmark = pytest.mark.usefixtures("no_proxy")


def lock_is_free(cache_dir: Path) -> bool:
    """Whether the cache's lock file exists and nobody holds it."""
    fd = os.open(cache_dir / store.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def import_file(tmp_path: Path, cache_dir: Path, seed: int) -> tuple[Path, str]:
    """Import a small valid npz with ``--from`` (through main, as users do); return it and its sha256."""
    data = npz_bytes(make_arrays(seed=seed))
    source = tmp_path / f"copied-{seed}.npz"
    source.write_bytes(data)
    assert prefetch_cli.main(["--from", str(source), f"data.cache_dir={cache_dir}"]) == 0
    return source, sha(data)


# ---------------------------------------------------------------------------- deadline and signals


def test_overall_deadline_stops_a_trickling_download(server: LoopbackServer, cache: Path) -> None:
    # 64 KB at 1 KB/s: each read arrives well within the 2 s per-read timeout, so only the
    # overall deadline can stop it before the minute the whole body takes.
    body = npz_bytes(make_arrays(n_train=80))
    url = server.add("/slow.npz", Route(body=body, trickle_bytes_per_s=1024))
    with pytest.raises(DownloadTimeoutError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=sha(body), retries=2, backoff_s=0.0, timeout_s=2.0,
                          max_time_s=1.5, progress=False)
    message = str(info.value)
    assert "--max-time-s 1.5" in message and url in message and "--from" in message
    assert 0 < server.bytes_sent("/slow.npz") < len(body)
    assert server.count("/slow.npz") == 1  # a missed deadline is not retried
    assert_clean(cache)
    assert lock_is_free(cache)


def test_max_time_option_reaches_the_download(server: LoopbackServer, cache: Path, capsys) -> None:
    body = npz_bytes(make_arrays(n_train=80))
    url = server.add("/slow.npz", Route(body=body, trickle_bytes_per_s=1024))
    rc = prefetch_cli.main(["--url", url, "--timeout-s", "2", "--max-time-s", "1", f"data.cache_dir={cache}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 1 and len(errors) == 1 and "did not finish within --max-time-s 1 " in errors[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_download_cleans_up(server: LoopbackServer, cache: Path, signum: int) -> None:
    body = npz_bytes(make_arrays(n_train=80))
    url = server.add("/slow.npz", Route(body=body, trickle_bytes_per_s=1024))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_hpc.login.prefetch", "--url", url, "--sha256", sha(body),
         f"data.cache_dir={cache}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    try:
        # Mid-download: bytes have arrived in a staging directory and the lock is held.
        until(lambda: server.bytes_sent("/slow.npz") > 0 and any(
            any(d.iterdir()) for d in cache.glob(store.STAGING_PREFIX + "*")), "the download to start")
        assert not lock_is_free(cache)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert out == ""
    assert_clean(cache)  # no staging directory, no partial file
    assert lock_is_free(cache)


# ---------------------------------------------------------------------------- the download's size bound

ENDLESS = 10**12  # zero bytes a route sends after its body: more than any client should take
SMALL_BOUND = 1 << 20  # tests that must stream past the bound lower it from MNIST's 472 MB to this
FAST = {"retries": 3, "backoff_s": 0.0, "timeout_s": 10.0, "progress": False}


def response_ends(server: LoopbackServer, path: str) -> None:
    """Wait until every response at ``path`` has ended: sent whole, or its client closed the connection."""
    until(lambda: server.responses_ended(path) == server.count(path), f"the responses at {path} to end")


def test_a_content_length_over_the_bound_is_refused_from_the_header(server: LoopbackServer, small_tmpfs) -> None:
    """The issue's server: it announces 10**12 bytes and sends zeros without end.

    The cache is a 1 MB tmpfs, so a client that staged more than 1 MB would fail with ENOSPC.
    """
    url = server.add("/huge.npz", Route(content_length=ENDLESS, zeros=ENDLESS))
    cache_dir = small_tmpfs("cache", "1m")
    with pytest.raises(DownloadTooLargeError) as info:
        prefetch_fetch.prefetch(cache_dir / "mnist.npz", url=url, **FAST)
    message = str(info.value)
    assert message == (
        f"refused the download from {url}: the server announces {ENDLESS:,} bytes (Content-Length), more than "
        f"any MNIST-like npz holds ({MAX_NPZ_BYTES:,} bytes at most); nothing was kept. It is not an MNIST file: "
        "check --url"
    )
    assert (info.value.announced, info.value.received) == (ENDLESS, 0)  # no body byte was read
    assert server.count("/huge.npz") == 1  # not retried: it cannot pass
    response_ends(server, "/huge.npz")  # the client closed the connection
    assert server.bytes_sent("/huge.npz") < MAX_NPZ_BYTES  # what socket buffers took, not a download
    assert_clean(cache_dir)


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
def test_an_endless_body_without_content_length_is_refused_past_the_bound(
    server: LoopbackServer, small_tmpfs, monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    """No size announced: the stream is cut as soon as more than the bound has arrived, and the
    staged file never exceeds it: the cache is a tmpfs of exactly the bound (256 pages), where one
    byte more would fail with ENOSPC."""
    monkeypatch.setattr(fetch, "MAX_NPZ_BYTES", SMALL_BOUND)
    url = server.add("/endless.npz", Route(zeros=ENDLESS, omit_content_length=True, chunked=framing == "chunked"))
    cache_dir = small_tmpfs("cache", f"{SMALL_BOUND // 1024}k")
    with pytest.raises(DownloadTooLargeError) as info:
        prefetch_fetch.prefetch(cache_dir / "mnist.npz", url=url, **FAST)
    assert f"more than {SMALL_BOUND:,} bytes arrived (the server announced no size)" in str(info.value)
    assert "It is not an MNIST file: check --url" in str(info.value)
    assert info.value.announced is None
    assert SMALL_BOUND < info.value.received <= SMALL_BOUND + download.CHUNK_BYTES
    assert server.count("/endless.npz") == 1
    response_ends(server, "/endless.npz")  # the stream stopped: the client closed the connection
    assert server.bytes_sent("/endless.npz") > SMALL_BOUND
    assert_clean(cache_dir)


def test_a_compressed_body_is_bounded_by_its_inflated_size(
    server: LoopbackServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that gzips anyway (we ask for identity): 8 MB of zeros in 8 KB, a small honest Content-Length."""
    monkeypatch.setattr(fetch, "MAX_NPZ_BYTES", SMALL_BOUND)
    bomb = gzip.compress(bytes(8 * SMALL_BOUND))
    url = server.add("/bomb.npz", Route(body=bomb, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(DownloadTooLargeError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, **FAST)
    assert info.value.announced == len(bomb) < SMALL_BOUND
    assert SMALL_BOUND < info.value.received <= SMALL_BOUND + download.CHUNK_BYTES
    assert server.count("/bomb.npz") == 1
    assert_clean(cache)


def test_a_download_of_mnists_size_passes_the_bound(server: LoopbackServer, cache: Path) -> None:
    """About the 11.5 MB of Keras' mnist.npz, with its true Content-Length and the real bound."""
    data = npz_bytes(make_arrays(n_train=12_500, n_test=2_100))
    assert 11_000_000 < len(data) < 12_000_000
    url = server.add("/mnist.npz", Route(body=data))
    manifest = prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=sha(data), **FAST)
    assert manifest["size"] == len(data) and (cache / "mnist.npz").read_bytes() == data
    assert manifest["shapes"]["x_train"] == [12_500, 28, 28]
    assert server.count("/mnist.npz") == 1
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
def test_a_real_file_without_content_length_is_downloaded(
    server: LoopbackServer, good, cache: Path, framing: str
) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data, omit_content_length=True, chunked=framing == "chunked"))
    manifest = prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=digest, **FAST)
    assert manifest["sha256"] == digest and (cache / "mnist.npz").read_bytes() == data
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_a_content_length_shorter_than_the_body_is_what_is_read(server: LoopbackServer, good, cache: Path) -> None:
    """The announced length is what is read: the zeros a server sends beyond it never reach the cache."""
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data, zeros=ENDLESS))
    manifest = prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=digest, **FAST)
    assert manifest["size"] == len(data) and (cache / "mnist.npz").read_bytes() == data
    response_ends(server, "/mnist.npz")  # and the connection was closed, not left streaming
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_a_content_length_cutting_the_file_short_is_refused(server: LoopbackServer, good, cache: Path) -> None:
    _, data, digest = good
    url = server.add("/mnist.npz", Route(body=data, content_length=len(data) // 2))
    with pytest.raises(HashMismatchError) as info:
        prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=digest, **FAST)
    assert info.value.got == sha(data[: len(data) // 2])
    assert server.count("/mnist.npz") == 1
    assert_clean(cache)


def test_a_redirects_body_is_not_read(server: LoopbackServer, good, cache: Path) -> None:
    """requests reads a redirect's whole body into memory before following it; ours is closed unread."""
    _, data, digest = good
    target = server.add("/mnist.npz", Route(body=data))
    redirect_zeros = 64 << 20
    url = server.add("/old.npz", Route(status=302, headers={"Location": target}, omit_content_length=True,
                                       zeros=redirect_zeros))
    assert prefetch_fetch.prefetch(cache / "mnist.npz", url=url, sha256=digest, **FAST)["sha256"] == digest
    response_ends(server, "/old.npz")
    assert server.bytes_sent("/old.npz") < redirect_zeros // 2  # socket buffers at most, not the whole body
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


# ---------------------------------------------------------------------------- imported caches


def test_plain_prefetch_keeps_a_valid_import(tmp_path: Path, cache: Path, capsys) -> None:
    source, digest = import_file(tmp_path, cache, seed=1)
    capsys.readouterr()
    mtime = os.stat(object_path(cache / "mnist.npz", digest)).st_mtime_ns

    assert prefetch_cli.main([f"data.cache_dir={cache}"]) == 0  # offline: a download would fail

    out, err = capsys.readouterr()
    assert out.strip() == str(cache / "mnist.npz")
    assert err.count("\n") == 1 and "replacing" not in err
    assert f"already cached and verified: {cache / 'mnist.npz'}" in err
    assert f"from {source}" in err and "differs from the file Keras pins" in err and KERAS_MNIST_SHA256[:12] in err
    assert os.stat(object_path(cache / "mnist.npz", digest)).st_mtime_ns == mtime
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))


def test_repair_command_reuses_the_recorded_source(tmp_path: Path) -> None:
    target = tmp_path / "c d" / "digits.npz"
    base = {"sha256": "ab" * 32}
    assert prefetch_command(target) == f"mnist-hpc-prefetch 'data.cache_dir={target.parent}' data.filename=digits.npz"
    imported = prefetch_command(target, {**base, "source_kind": "npz", "source": "/data/my file.npz"})
    assert imported.endswith("data.filename=digits.npz --from '/data/my file.npz' --force")
    mirror = prefetch_command(target, {**base, "source_kind": "download", "source": "http://mirror/m.npz"})
    assert mirror.endswith(f"--url http://mirror/m.npz --sha256 {'ab' * 32} --force")
    keras = prefetch_command(target, {**base, "source_kind": "download", "source": KERAS_MNIST_URL})
    assert keras.endswith("data.filename=digits.npz --force")


# ---------------------------------------------------------------------------- odd --from paths


def odd_source(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "odd.npz"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "passwd-link":
        os.symlink("/etc/passwd", path)
    elif kind == "bare-npy":
        with open(path, "wb") as fh:
            np.save(fh, make_arrays()["x_train"])
    elif kind == "pickle":
        with open(path, "wb") as fh:
            np.save(fh, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif kind == "dangling-link":
        os.symlink(tmp_path / "gone.npz", path)
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("fifo", "is a FIFO (named pipe), not a file"),
        ("passwd-link", "(a symbolic link to /etc/passwd) is not a readable npz archive: it is a text file"),
        ("bare-npy", "is not a readable npz archive: it is a bare .npy array"),
        ("pickle", "is not a readable npz archive: it is a bare .npy array"),
        ("dangling-link", "no such file or directory"),
    ],
)
def test_odd_from_paths_give_one_message_and_write_nothing(tmp_path: Path, kind: str, expected: str) -> None:
    source = odd_source(kind, tmp_path)
    cache_dir = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_hpc.login.prefetch", "--from", str(source), f"data.cache_dir={cache_dir}"],
        capture_output=True, text=True, env=subprocess_env(), timeout=60,  # a FIFO that was opened would hang
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mnist-hpc-prefetch: error: ")
    assert expected in proc.stderr and str(source) in proc.stderr
    assert "allow_pickle" not in proc.stderr and "Traceback" not in proc.stderr
    assert not cache_dir.exists()


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("filename", "expected"),
    [("../../x.npz", "no '/'"), ("", "give a file name"), (".mnist.npz.objects", "reserved"),
     ("a.npz.manifest.json", "reserved")],
)
def test_bad_filenames_are_refused_at_config_time(compose, tmp_path: Path, filename: str, expected: str, capsys) -> None:
    from mnist_hpc.config import to_typed

    overrides = [f"data.cache_dir={tmp_path / 'cache'}", f"data.filename={filename}"]
    with pytest.raises(ConfigError) as info:
        to_typed(compose(overrides))
    assert f"data.filename={filename!r}" in str(info.value) and expected in str(info.value)
    assert prefetch_cli.main(overrides) == 2
    assert "data.filename" in capsys.readouterr().err
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------- replaced objects


def test_replaced_object_stays_for_its_grace_period_then_goes(tmp_path: Path, cache: Path) -> None:
    target = cache / "mnist.npz"
    _, first = import_file(tmp_path, cache, seed=1)
    _, second = import_file(tmp_path, cache, seed=2)
    # A job that read the first manifest a moment ago still finds its object.
    assert sorted(listing(objects_dir(target))) == sorted([f"{first}.npz", f"{second}.npz"])
    assert os.readlink(target) == view_target(target, second)
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))

    os.unlink(target)  # a stale link (e.g. a crash between manifest and link) is repaired too
    os.symlink(view_target(target, first), target)
    switched = manifest_path(target).stat().st_mtime - store.GC_GRACE_S - 1
    os.utime(manifest_path(target), (switched, switched))
    assert prefetch_cli.main([f"data.cache_dir={cache}"]) == 0  # the valid-cache path tidies
    assert listing(objects_dir(target)) == [f"{second}.npz"]
    assert os.readlink(target) == view_target(target, second)


def test_lock_file_in_a_group_directory_is_group_writable(tmp_path: Path, good) -> None:
    _, data, _ = good
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    source = tmp_path / "copied.npz"
    source.write_bytes(data)
    old = os.umask(0o022)  # a user whose umask would make every file private to them
    try:
        prefetch_fetch.prefetch(shared / "mnist.npz", source=source)
        first = os.stat(shared / store.LOCK_NAME)
        prefetch_fetch.prefetch(shared / "mnist.npz", source=source, force=True)
    finally:
        os.umask(old)
    lock = os.stat(shared / store.LOCK_NAME)
    assert (lock.st_ino, lock.st_dev) == (first.st_ino, first.st_dev)  # never removed and recreated
    assert stat.S_IMODE(lock.st_mode) == 0o664
    assert stat.S_IMODE(os.stat(objects_dir(shared / "mnist.npz")).st_mode) & 0o070 == 0o070
    manifest = json.loads(manifest_path(shared / "mnist.npz").read_text())
    assert stat.S_IMODE(os.stat(object_path(shared / "mnist.npz", manifest["sha256"])).st_mode) == 0o444


def test_a_world_writable_directory_is_no_groups_space(tmp_path: Path, good) -> None:
    """A cache made inside a 1777 scratch directory, or one that is 0777 itself, under umask 077:
    nothing gets group bits there (the writer's group may be one that every user shares)."""
    _, data, _ = good
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o1777)
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    source = tmp_path / "copied.npz"
    source.write_bytes(data)
    old = os.umask(0o077)
    try:
        prefetch_fetch.prefetch(scratch / "alice" / "mnist.npz", source=source)
        prefetch_fetch.prefetch(loose / "mnist.npz", source=source)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(scratch / "alice").st_mode) == 0o700
    for cache_dir in (scratch / "alice", loose):
        target = cache_dir / "mnist.npz"
        digest = json.loads(manifest_path(target).read_text())["sha256"]
        modes = {path.name: stat.S_IMODE(os.lstat(path).st_mode) for path in (
            manifest_path(target), cache_dir / store.LOCK_NAME, objects_dir(target), object_path(target, digest))}
        assert modes == {manifest_path(target).name: 0o600, store.LOCK_NAME: 0o600, objects_dir(target).name: 0o700,
                         f"{digest}.npz": 0o400}, cache_dir


def test_deleting_the_link_deletes_the_dataset_for_jobs(tmp_path: Path, cache: Path) -> None:
    """``mnist.npz`` is the name users know: without it a job reports a missing cache."""
    from mnist_hpc.cache import CacheMissingError, read_verified
    from mnist_hpc.config import DataConfig

    _, digest = import_file(tmp_path, cache, seed=1)
    assert read_verified(DataConfig(cache_dir=str(cache)))[1]["sha256"] == digest
    os.unlink(cache / "mnist.npz")
    with pytest.raises(CacheMissingError, match=f"no cached MNIST at {cache / 'mnist.npz'}; run `mnist-hpc-prefetch"):
        read_verified(DataConfig(cache_dir=str(cache)))
    assert prefetch_cli.main(["--from", str(tmp_path / "copied-1.npz"), f"data.cache_dir={cache}"]) == 0
    assert read_verified(DataConfig(cache_dir=str(cache)))[1]["sha256"] == digest


def test_a_cache_of_the_previous_format_is_adopted_offline(tmp_path: Path, cache: Path, good) -> None:
    """A regular mnist.npz with an old manifest (no format): jobs are told how to adopt it, and that works."""
    from mnist_hpc.cache import CacheCorruptError, check_cached

    _, data, digest = good
    cache.mkdir()
    (cache / "mnist.npz").write_bytes(data)
    old = {"source": "/old/mnist.npz", "source_kind": "npz", "sha256": digest, "size": len(data)}
    manifest_path(cache / "mnist.npz").write_text(json.dumps(old))
    with pytest.raises(CacheCorruptError) as info:
        check_cached(cache / "mnist.npz")
    adopt = str(info.value).split("`")[1]
    assert "older mnist-hpc" in str(info.value) and adopt.endswith(f"--from {cache / 'mnist.npz'}")
    assert prefetch_cli.main(adopt.split()[1:]) == 0
    assert check_cached(cache / "mnist.npz")["sha256"] == digest
    assert_clean(cache, allowed=("mnist.npz", "mnist.npz.manifest.json"))

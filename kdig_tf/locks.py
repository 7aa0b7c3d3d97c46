"""One process at a time per run or store directory: an exclusive lock file that knows its holder.

Two processes writing one run directory interleave their epoch logs and checkpoints and can
leave a student that no single run trained. :class:`DirLock` holds ``<dir>/.lock`` for the
whole run: the file records the holder (pid, host, start time, command), and the kernel's
``flock`` on it is what excludes. The kernel drops a ``flock`` when its process dies, even by
``kill -9``, so a lock file left by a dead process on this host is simply taken over. A lock
file of another host is trusted (``flock`` does not reach across machines on every file
system): the error says to delete it if that process is gone. On a file system without
``flock`` the recorded pid decides instead.
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from kdig_tf.errors import WorkdirBusyError

LOCK_FILE = ".lock"


def _host():
    return socket.gethostname()


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's live process, or an unreadable pid: do not take it over
    return True


def _read_holder(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder):
    """``pid 123 on host h since 2024-...: python scripts/distill.py ...`` for a lock record."""
    if not holder:
        return "another process"
    command = f": {holder['command']}" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started_utc')}{command}"


class DirLock:
    """``with DirLock(directory):`` holds ``directory/name`` or raises WorkdirBusyError naming the holder.

    The directory is created if needed. With ``remove_empty=True`` it is removed again on
    release if the lock made it and nothing else was written to it, so a run refused before
    it wrote anything leaves nothing behind.
    """

    def __init__(self, directory, name=LOCK_FILE, what="run directory", remove_empty=False):
        self.directory, self.what, self.remove_empty = directory, what, remove_empty
        self.path = os.path.join(directory, name)
        self._fd = None
        self._made_directory = False

    def acquire(self):
        if self._fd is not None:
            raise WorkdirBusyError(f"{self.path} is already held by this lock object")
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, exist_ok=True)
            self._made_directory = True
        for _ in range(100):  # retried only if a holder removed the file while we opened it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._lock_or_refuse(fd) and self._still_at_path(fd):
                    self._write_record(fd)
                    self._fd, fd = fd, None
                    return self
            finally:
                if fd is not None:
                    os.close(fd)
        raise WorkdirBusyError(f"{self.path} keeps changing hands; is another process starting runs in a loop?")

    def _lock_or_refuse(self, fd):
        """Take the flock of ``fd``; raise WorkdirBusyError if a live process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self._busy(_read_holder(fd))
            # No flock on this file system: the recorded pid decides (on this host).
            holder = _read_holder(fd)
            if holder and (holder.get("host") != _host() or
                           (holder.get("pid") != os.getpid() and _pid_alive(holder.get("pid")))):
                self._busy(holder)
            return True
        holder = _read_holder(fd)
        if holder and holder.get("host") != _host():
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._busy(holder, other_host=True)
        return True

    def _still_at_path(self, fd):
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _write_record(self, fd):
        record = {"pid": os.getpid(), "host": _host(),
                  "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        self.holder = record

    def _busy(self, holder, other_host=False):
        hint = (f"if that process is gone, delete {self.path}" if other_host
                else "wait for it to finish, or use another directory")
        raise WorkdirBusyError(f"{self.what} {self.directory} is in use by {describe(holder)}; {hint}")

    def release(self):
        if self._fd is None:
            return
        try:
            if self._still_at_path(self._fd):
                os.remove(self.path)  # while still holding the flock, so no one else's file is removed
        finally:
            os.close(self._fd)
            self._fd = None
        if self._made_directory and self.remove_empty:
            try:
                os.rmdir(self.directory)  # only succeeds if nothing else was written
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
        return False

"""One training run per workdir: an exclusive `fcntl.flock` on WORKDIR/.lock for the run's
whole life. The kernel releases it when the process dies, however it dies, so a lock
left by a killed run never blocks the next one. The file records who holds it (host,
pid, start time) so a refused run can say so."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from jaxlm.errors import ConfigError

LOCK_NAME = ".lock"


class WorkdirLock:
  """`with WorkdirLock(workdir):` or acquire()/release(). A second holder is refused
  at once with a one-line ConfigError naming the holder."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.fd: int | None = None

  def acquire(self) -> WorkdirLock:
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(os.read(fd, 4096))
      os.close(fd)
      raise ConfigError(f"--workdir {self.workdir} is in use by another run ({holder}); wait "
                        "for it to finish, or use another --workdir") from None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _describe(raw: bytes) -> str:
  try:
    info = json.loads(raw.decode())
    return f"pid {info['pid']} on {info['host']}, started {info['started']}"
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    return "holder unknown"

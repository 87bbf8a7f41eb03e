#!/usr/bin/python3
"""A pass-through FUSE filesystem whose fsync is slow: the slow-disk test's volume.

    slowfs.py BACKING_DIR MOUNTPOINT DELAY_FILE

Every fsync (of a file or a directory) sleeps for the number of milliseconds written in
DELAY_FILE (read at each call; missing or empty means 0), then syncs the backing file: a
volume that takes seconds to make data durable, the way a busy or failing disk does. A
second number in DELAY_FILE, if any, is the delay of each open of an existing file: a disk
whose reads crawl (a cold cache on a failing or network block device).
Everything else passes straight through. Multi-threaded, so fsyncs of different files
overlap as they would on a real queue. Needs python3-fusepy (Debian) and /dev/fuse.
"""

import errno
import os
import sys
import time

from fusepy import FUSE, FuseOSError, Operations


class SlowFs(Operations):
    def __init__(self, root, delay_file):
        self.root = os.path.realpath(root)
        self.delay_file = delay_file

    def __call__(self, op, path, *args):
        try:
            return super().__call__(op, self.root + path, *args)
        except OSError as e:
            raise FuseOSError(e.errno or errno.EIO) from e

    def slow(self, which=0):
        try:
            with open(self.delay_file) as f:
                delays = f.read().split()
            ms = int(delays[which]) if which < len(delays) else 0
        except (OSError, ValueError):
            ms = 0
        time.sleep(ms / 1000)

    def access(self, path, mode):
        if not os.access(path, mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(path)
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def create(self, path, mode, fi=None):
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    def open(self, path, flags):
        self.slow(1)
        return os.open(path, flags)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(path, length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)

    def fsync(self, path, datasync, fh):
        self.slow()
        os.fsync(fh)

    def opendir(self, path):
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def releasedir(self, path, fh):
        os.close(fh)

    def fsyncdir(self, path, datasync, fh):
        self.slow()
        os.fsync(fh)

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(path)

    def rename(self, old, new):
        os.rename(old, self.root + new)

    def unlink(self, path):
        os.unlink(path)

    def mkdir(self, path, mode):
        os.mkdir(path, mode)

    def rmdir(self, path):
        os.rmdir(path)

    def chmod(self, path, mode):
        os.chmod(path, mode)

    def chown(self, path, uid, gid):
        os.chown(path, uid, gid)

    def utimens(self, path, times=None):
        os.utime(path, times)

    def readlink(self, path):
        return os.readlink(path)

    def symlink(self, target, source):
        os.symlink(source, target)

    def statfs(self, path):
        st = os.statvfs(path)
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}


if __name__ == "__main__":
    backing, mountpoint, delay_file = sys.argv[1:4]
    FUSE(SlowFs(backing, delay_file), mountpoint, foreground=True, nothreads=False, default_permissions=True)

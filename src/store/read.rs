//! Reading files that anyone may have replaced: regular files only (a FIFO never blocks the
//! reader, a device never floods it) and never more than a cap.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The most any state, status or sink file may hold: they are a few KiB, and a server reply
/// is capped at 256 KiB.
pub const MAX_FILE: u64 = 2 * 1024 * 1024;

/// Reads `path` whole if it is a regular file of at most `cap` bytes. `O_NONBLOCK` makes the
/// open of a FIFO return at once; the type is checked on the open file (no race with a swap).
/// Errors: `InvalidInput` for a file that is not regular, `FileTooLarge` above the cap.
pub fn read_regular(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file (a {})", kind(meta.file_type())),
        ));
    }
    let too_large =
        || io::Error::new(io::ErrorKind::FileTooLarge, format!("larger than {cap} bytes"));
    if meta.len() > cap {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow after the fstat: the cap holds whatever happens.
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(bytes)
}

fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"12345");
        assert_eq!(read_regular(&f, 4).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo (coreutils) is missing");
        // Without O_NONBLOCK this open would block forever (no writer).
        let e = read_regular(&fifo, 5).unwrap_err();
        assert!(e.kind() == io::ErrorKind::InvalidInput && e.to_string().contains("FIFO"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 5).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        assert!(read_regular(dir.path(), 5).is_err());
        let sparse = dir.path().join("sparse");
        std::fs::File::create(&sparse).unwrap().set_len(1 << 30).unwrap();
        assert_eq!(
            read_regular(&sparse, MAX_FILE).unwrap_err().kind(),
            io::ErrorKind::FileTooLarge
        );
    }
}

//! The log file: header, append with commit markers, replay with torn-tail handling.

use crate::record::{DecodeError, Record};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// First bytes of every log file.
pub(crate) const HEADER: &[u8; 16] = b"HOLDFAST-LOG-v1\n";
/// Body of a commit marker (after its type byte).
const COMMIT_MAGIC: &[u8; 8] = b"COMMIT!\n";

/// The engine's files in its directory.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub(crate) log: PathBuf,
    pub(crate) compact: PathBuf,
    pub(crate) lock: PathBuf,
    /// The high-water record: the last acknowledged commit and the log file it is in.
    pub(crate) hwm: PathBuf,
    /// Present after `holdfast disk new-epochs`: the next start gives every stream a new epoch.
    pub(crate) new_epochs: PathBuf,
}

impl Paths {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            log: dir.join("holdfast.log"),
            compact: dir.join("holdfast.log.compact"),
            lock: dir.join("LOCK"),
            hwm: dir.join("holdfast.hwm"),
            new_epochs: dir.join("NEW-EPOCHS"),
        }
    }
}

/// Why the store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another process holds the directory.
    #[error("{0} is in use by another holdfast process")]
    Locked(PathBuf),
    /// Not a Holdfast log.
    #[error("{0} is not a Holdfast log (bad header)")]
    NotALog(PathBuf),
    /// Damage before the end of the log: refusing to serve wrong offsets.
    #[error(
        "{path} is corrupted at byte {at}: {reason}. Holdfast refuses to start rather than serve \
         wrong offsets. Restore a backup, or move the data aside and start empty with \
         `holdfast disk reset` (clients are then told recovered: false)"
    )]
    Corrupted {
        /// File concerned.
        path: PathBuf,
        /// Byte offset of the first bad record.
        at: u64,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Appends a commit marker closing the batch before it, carrying the batch's sequence number
/// (1, 2, 3… over the life of the directory, compactions included).
pub(crate) fn encode_commit(out: &mut Vec<u8>, seq: u64) {
    let mut body = Vec::with_capacity(17);
    body.push(COMMIT_SEQ_TYPE);
    body.extend_from_slice(COMMIT_MAGIC);
    body.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// A commit marker without a sequence number (logs written before sequence numbers).
const COMMIT_TYPE: u8 = 0xC0;
/// A commit marker with its sequence number.
const COMMIT_SEQ_TYPE: u8 = 0xC1;

/// A commit marker at the start of `buf`: its length and its sequence number (None for the
/// older markers without one).
fn is_commit(buf: &[u8]) -> Option<(usize, Option<u64>)> {
    if buf.len() < 17 {
        return None;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    match (len, buf[8]) {
        (9, COMMIT_TYPE) if &buf[9..17] == COMMIT_MAGIC => {
            (crc32fast::hash(&buf[8..17]) == crc).then_some((17, None))
        }
        (17, COMMIT_SEQ_TYPE) if buf.len() >= 25 && &buf[9..17] == COMMIT_MAGIC => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&buf[17..25]);
            (crc32fast::hash(&buf[8..25]) == crc).then_some((25, Some(u64::from_le_bytes(seq))))
        }
        _ => None,
    }
}

/// What a replay found.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Bytes of the log that are committed (the file is truncated to this).
    pub(crate) committed: u64,
    /// Bytes of a torn last batch that were discarded.
    pub(crate) torn: u64,
    /// Records applied.
    pub(crate) records: u64,
    /// Sequence number of the last committed batch (0: none carries one).
    pub(crate) last_seq: u64,
}

/// Reads the log, calling `apply` for every record of every committed batch, in order. A torn
/// last batch (the write a crash interrupted) is discarded; damage with committed data after it
/// is an error.
pub(crate) fn replay(path: &Path, mut apply: impl FnMut(Record)) -> Result<Replayed, OpenError> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(io_err(path))?;
    if buf.len() < HEADER.len() || &buf[..HEADER.len()] != HEADER {
        return Err(OpenError::NotALog(path.to_owned()));
    }
    let mut pos = HEADER.len();
    let mut pending = Vec::new();
    let mut out = Replayed {
        committed: pos as u64,
        ..Default::default()
    };
    while pos < buf.len() {
        if let Some((n, seq)) = is_commit(&buf[pos..]) {
            out.records += pending.len() as u64;
            pending.drain(..).for_each(&mut apply);
            pos += n;
            out.committed = pos as u64;
            if let Some(seq) = seq {
                out.last_seq = seq;
            }
            continue;
        }
        match Record::decode(&buf[pos..]) {
            Ok((rec, n)) => {
                pending.push(rec);
                pos += n;
            }
            Err(DecodeError::Truncated) => break,
            Err(DecodeError::Corrupt(why)) => {
                // Committed data after the damage means the damage is not a torn tail.
                if (pos + 1..buf.len()).any(|p| is_commit(&buf[p..]).is_some()) {
                    return Err(OpenError::Corrupted {
                        path: path.to_owned(),
                        at: pos as u64,
                        reason: why.to_owned(),
                    });
                }
                break;
            }
        }
    }
    out.torn = buf.len() as u64 - out.committed;
    Ok(out)
}

/// Creates a log file with just the header (fsynced).
pub(crate) fn create(path: &Path) -> Result<(), OpenError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(HEADER)
        .and_then(|()| f.sync_all())
        .map_err(io_err(path))
}

/// Opens the log for appending after `committed` bytes, cutting any torn tail.
pub(crate) fn open_append(path: &Path, committed: u64) -> Result<File, OpenError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(committed).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(committed)).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(f)
}

/// Fsyncs a directory so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

//! The high-water record: evidence, kept outside the log, of how far the log had got.
//!
//! After every commit the writer records the commit's sequence number and the identity of the
//! log file it is in (inode and change time). The record is written after every commit and
//! synced to disk at most once a second and at shutdown (a second fsync per commit cost a third
//! of the publish throughput): it survives any crash of the process, and lags at most a second
//! behind the log after a power cut. On start the log is checked against it. A log that
//! ends before the recorded commit (cut short, a lost write) or a log file that is not the one
//! recorded (a backup copied back: copying sets a new change time, which no tool can set back)
//! went backwards: offsets the clients saw could be handed out again for other publications. The
//! engine then gives every stream a new epoch, so clients are told (`recovered: false`).
//!
//! The file holds two 80-byte slots written alternately, each with a generation counter and a
//! CRC, so a write torn by a crash leaves the other slot readable.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const SLOT: usize = 80;
const MAGIC: &[u8; 8] = b"HFHWM\0\0\x01";

/// Which file a log is: inode and change time. Any change of the file by another program
/// (copied back, truncated, rewritten) changes the change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Identity {
    pub(crate) ino: u64,
    pub(crate) ctime_sec: i64,
    pub(crate) ctime_nsec: i64,
}

impl Identity {
    pub(crate) fn of(meta: &Metadata) -> Self {
        Self {
            ino: meta.ino(),
            ctime_sec: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// One record: the last acknowledged commit and the log file holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Mark {
    /// Sequence number of the last commit acknowledged from the log.
    pub(crate) seq: u64,
    /// The log file.
    pub(crate) log: Identity,
    /// Inode of a compacted log about to replace the log (0 = none): a crash between the
    /// rename and the next record leaves the log with this inode, which is not a rollback.
    pub(crate) pending_ino: u64,
    /// Length of the log after the commit.
    pub(crate) len: u64,
}

fn encode(m: &Mark, generation: u64) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&m.seq.to_le_bytes());
    b[16..24].copy_from_slice(&m.log.ino.to_le_bytes());
    b[24..32].copy_from_slice(&m.log.ctime_sec.to_le_bytes());
    b[32..40].copy_from_slice(&m.log.ctime_nsec.to_le_bytes());
    b[40..48].copy_from_slice(&m.pending_ino.to_le_bytes());
    b[48..56].copy_from_slice(&m.len.to_le_bytes());
    b[56..64].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&b[..64]);
    b[64..68].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A valid slot: (generation, mark).
fn decode(b: &[u8]) -> Option<(u64, Mark)> {
    if b.len() < SLOT || &b[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([b[64], b[65], b[66], b[67]]);
    if crc32fast::hash(&b[..64]) != crc {
        return None;
    }
    Some((
        u64_at(b, 56),
        Mark {
            seq: u64_at(b, 8),
            log: Identity {
                ino: u64_at(b, 16),
                ctime_sec: u64_at(b, 24) as i64,
                ctime_nsec: u64_at(b, 32) as i64,
            },
            pending_ino: u64_at(b, 40),
            len: u64_at(b, 48),
        },
    ))
}

/// The newest valid record of the file and its generation; None when the file is missing or
/// holds no valid slot.
pub(crate) fn read(path: &Path) -> std::io::Result<Option<(u64, Mark)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(bytes
        .chunks(SLOT)
        .take(2)
        .filter_map(decode)
        .max_by_key(|(generation, _)| *generation))
}

/// The record file, open for the writer.
#[derive(Debug)]
pub(crate) struct HighWater {
    file: File,
    generation: u64,
    /// A record was written since the last sync.
    dirty: bool,
}

impl HighWater {
    /// Opens (or creates) the file.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let generation = read(path)?.map_or(0, |(g, _)| g);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self {
            file,
            generation,
            dirty: false,
        })
    }

    /// Records `mark` in the older slot (not synced: see [`HighWater::sync`]).
    pub(crate) fn write(&mut self, mark: &Mark) -> std::io::Result<()> {
        let generation = self.generation + 1;
        let slot = (generation % 2) * SLOT as u64;
        self.file.write_all_at(&encode(mark, generation), slot)?;
        self.generation = generation;
        self.dirty = true;
        Ok(())
    }

    /// Whether a record waits for a sync.
    #[cfg(test)]
    pub(crate) fn dirty(&self) -> bool {
        self.dirty
    }

    /// Puts the records on stable storage.
    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }
}

/// Why a log is judged to have gone backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rollback {
    /// The log ends before the last acknowledged commit.
    Behind { log: u64, acknowledged: u64 },
    /// The log file is not the one the record names (a copy put back, or changed by another
    /// program).
    Replaced,
    /// The record is missing while the log has sequenced commits.
    Missing,
    /// An operator asked for it (`holdfast disk new-epochs`, after restoring a snapshot).
    Requested,
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollback::Behind { log, acknowledged } => write!(
                f,
                "the log ends at commit {log} but commit {acknowledged} was acknowledged \
                 ({} acknowledged commit(s) are missing: a truncated log, a lost write or an \
                 older copy)",
                acknowledged - log
            ),
            Rollback::Replaced => f.write_str(
                "the log file is not the one this directory last wrote (a backup copied back, \
                 or the file changed outside Holdfast)",
            ),
            Rollback::Missing => f.write_str(
                "the high-water record (holdfast.hwm) is missing: nothing vouches for how far \
                 the log had got",
            ),
            Rollback::Requested => {
                f.write_str("new epochs were asked for with `holdfast disk new-epochs`")
            }
        }
    }
}

/// What replaying a log found, for judging it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Found {
    /// Sequence number of its last commit.
    pub(crate) seq: u64,
    /// Its file.
    pub(crate) identity: Identity,
    /// Bytes up to the end of its last commit.
    pub(crate) committed: u64,
    /// Bytes after that (a write a crash cut short).
    pub(crate) torn: u64,
}

/// Judges a log against the record.
pub(crate) fn judge(record: Option<&Mark>, found: Found) -> Option<Rollback> {
    let (log_seq, identity) = (found.seq, found.identity);
    let Some(m) = record else {
        // Logs written before sequence numbers have no record yet: nothing to compare.
        return (log_seq > 0).then_some(Rollback::Missing);
    };
    if log_seq < m.seq {
        return Some(Rollback::Behind {
            log: log_seq,
            acknowledged: m.seq,
        });
    }
    // A log ahead of its record is what a power cut leaves (the record is synced once a
    // second): nothing to hold against it.
    let same_file = identity == m.log || (m.pending_ino != 0 && identity.ino == m.pending_ino);
    // A crash in the middle of the next write changes the file after the record, and leaves
    // that write torn after exactly the recorded length.
    let torn_after_record = identity.ino == m.log.ino && found.torn > 0 && found.committed == m.len;
    if log_seq == m.seq && !same_file && !torn_after_record {
        return Some(Rollback::Replaced);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64, ctime: i64) -> Identity {
        Identity {
            ino,
            ctime_sec: ctime,
            ctime_nsec: 7,
        }
    }

    fn found(seq: u64, identity: Identity) -> Found {
        Found {
            seq,
            identity,
            committed: 500,
            torn: 0,
        }
    }

    #[test]
    fn judging_a_log_against_its_record() {
        let m = Mark {
            seq: 10,
            log: id(5, 100),
            pending_ino: 0,
            len: 500,
        };
        let judge = |f: Found| judge(Some(&m), f);
        assert_eq!(judge(found(10, id(5, 100))), None, "the same log");
        assert_eq!(
            judge(found(11, id(5, 101))),
            None,
            "crash before the record"
        );
        assert_eq!(
            judge(found(9, id(5, 100))),
            Some(Rollback::Behind {
                log: 9,
                acknowledged: 10
            })
        );
        assert_eq!(judge(found(10, id(6, 100))), Some(Rollback::Replaced));
        assert_eq!(judge(found(10, id(5, 200))), Some(Rollback::Replaced));
        let torn = Found {
            torn: 40,
            ..found(10, id(5, 200))
        };
        assert_eq!(judge(torn), None, "a crash in the middle of the next write");
        let torn_elsewhere = Found {
            committed: 300,
            ..torn
        };
        assert_eq!(judge(torn_elsewhere), Some(Rollback::Replaced));
        assert_eq!(
            judge(found(14, id(5, 100))),
            None,
            "a power cut: the record lags the log"
        );
        let pending = Mark {
            pending_ino: 9,
            ..m
        };
        assert_eq!(
            super::judge(Some(&pending), found(10, id(9, 300))),
            None,
            "compaction renamed"
        );
        assert_eq!(
            super::judge(None, found(0, id(1, 1))),
            None,
            "a log without sequence numbers"
        );
        assert_eq!(
            super::judge(None, found(3, id(1, 1))),
            Some(Rollback::Missing)
        );
    }

    #[test]
    fn slots_alternate_and_a_torn_slot_leaves_the_other() {
        let dir = std::env::temp_dir().join(format!("holdfast-hwm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("holdfast.hwm");
        assert_eq!(read(&path).expect("read"), None);
        let mut hw = HighWater::open(&path).expect("open");
        for seq in 1..=3 {
            let m = Mark {
                seq,
                log: id(1, 2),
                pending_ino: 0,
                len: 9,
            };
            hw.write(&m).expect("write");
            assert!(hw.dirty());
            hw.sync().expect("sync");
            assert!(!hw.dirty());
            assert_eq!(read(&path).expect("read").map(|(_, m)| m.seq), Some(seq));
        }
        // Tear the newest slot (generation 3 → slot 1): the older one (seq 2) is read.
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes[SLOT + 9] ^= 0xff;
        std::fs::write(&path, &bytes).expect("tear");
        assert_eq!(read(&path).expect("read").map(|(_, m)| m.seq), Some(2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The backup directory's format, and its checks.
//!
//! A backup directory holds:
//! - `manifest.json` ([`Manifest`], serde JSON): the format's name and version, when the backup
//!   started and finished, where it came from (the endpoints and node ids), totals, and one
//!   [`RangeEntry`] per range: its descriptor (id, key interval, epoch), the applied index its
//!   data is the state as of, the node that took it and when, and its data file with the
//!   file's keys, bytes of keys and values, size and CRC-32 (IEEE). Keys are written in hex;
//!   an empty end key is the end of the key space. Written last: a directory without it holds
//!   no complete backup.
//! - one data file per range (`r<id>-v<version>-i<applied index>.chunks`): a sequence of
//!   `flotilla.meta.SnapshotChunk` messages (the framing of a raft snapshot's data), each
//!   preceded by its length as a protobuf varint (prost's length-delimited encoding); the
//!   pairs in strictly ascending key order, all inside the range's interval. An empty range
//!   has an empty file.
//!
//! The ranges' intervals are disjoint and cover the key space ([`check_tiling`]); every check
//! here fails with a [`BackupError`] that names the file and what is wrong with it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use flotilla_proto::meta::SnapshotChunk;
use flotilla_proto::{Bytes, Message as _};
use serde::{Deserialize, Serialize};

use crate::output::show_bytes;

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// [`Manifest::format`].
pub const FORMAT: &str = "flotilla-backup";
/// [`Manifest::version`]: this program writes and reads version 1.
pub const FORMAT_VERSION: u32 = 1;
/// Largest chunk a data file may hold: more is a damaged length, not a chunk (a node sends
/// at most 2 MiB plus one pair).
const MAX_CHUNK_BYTES: u64 = 64 << 20;

/// What is wrong with a backup directory, or why it cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A backup is written only into a new or empty directory, never over another one.
    #[error("{} is not empty ({entries} entries): back up into a new or empty directory", dir.display())]
    DirNotEmpty {
        /// The directory.
        dir: PathBuf,
        /// How many entries it holds.
        entries: usize,
    },
    /// The path exists and is a file.
    #[error("{} exists and is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS's error.
        #[source]
        source: std::io::Error,
    },
    /// No manifest: not a backup directory, or a backup that did not finish.
    #[error("no {MANIFEST} in {}: not a backup directory, or its backup did not finish", .0.display())]
    ManifestMissing(PathBuf),
    /// The manifest does not parse or contradicts itself.
    #[error("{}: {reason}", path.display())]
    ManifestInvalid {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Two ranges of the manifest share keys.
    #[error("ranges r{left} and r{right} overlap (from key {at:?})")]
    Overlap {
        /// The range that starts first.
        left: u64,
        /// The other.
        right: u64,
        /// Where the second starts.
        at: String,
    },
    /// No range of the manifest holds the keys of `[from, to)`.
    #[error("no range holds the keys from {from:?} to {to:?}")]
    Gap {
        /// First key not covered ("" is the start of the key space).
        from: String,
        /// First key covered again ("" is the end of the key space).
        to: String,
    },
    /// A range's interval is empty or reversed.
    #[error("range r{range} has an empty interval [{start:?}, {end:?})")]
    EmptyInterval {
        /// The range.
        range: u64,
        /// Its start and end.
        start: String,
        /// Its end.
        end: String,
    },
    /// A data file the manifest lists is not there.
    #[error("{} is missing", file.display())]
    FileMissing {
        /// The file.
        file: PathBuf,
    },
    /// A data file's checksum differs from the manifest's: it was damaged.
    #[error("{}: checksum {found:08x}, the manifest says {expected:08x}: the file is damaged", file.display())]
    Checksum {
        /// The file.
        file: PathBuf,
        /// The manifest's CRC-32.
        expected: u32,
        /// The file's.
        found: u32,
    },
    /// A data file holds another number of keys, bytes or file bytes than the manifest says.
    #[error("{}: {what} is {found}, the manifest says {expected}", file.display())]
    Count {
        /// The file.
        file: PathBuf,
        /// `keys`, `bytes` or `file size`.
        what: &'static str,
        /// The manifest's.
        expected: u64,
        /// The file's.
        found: u64,
    },
    /// A data file does not decode, or holds a key out of order or outside its range (with a
    /// checksum that matches: it was written so).
    #[error("{}: {reason}", file.display())]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `manifest.json`: see the module doc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// When the backup started and finished (wall clock, ms since the Unix epoch). Every
    /// range's point lies between the two.
    pub started_unix_ms: u64,
    /// See `started_unix_ms`.
    pub finished_unix_ms: u64,
    /// The cluster it came from.
    pub source: Source,
    /// Pairs, and bytes of keys plus values, of all ranges.
    pub keys: u64,
    /// See `keys`.
    pub bytes: u64,
    /// The ranges, in key order: disjoint, covering the key space.
    pub ranges: Vec<RangeEntry>,
}

/// Where a backup came from. (A store's cluster id is not set by any node yet, so the
/// endpoints and node ids are what identify the cluster.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `--endpoints` of the backup.
    pub endpoints: Vec<String>,
    /// The node id behind each endpoint that answered.
    pub node_ids: Vec<u64>,
}

/// One range of a backup and its data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeEntry {
    /// The range's id in the source cluster.
    pub range_id: u64,
    /// `[start_key, end_key)` in hex; an empty end key is the end of the key space.
    #[serde(with = "hex")]
    pub start_key: Vec<u8>,
    /// See `start_key`.
    #[serde(with = "hex")]
    pub end_key: Vec<u8>,
    /// The range's epoch at the backup's point.
    pub conf_ver: u64,
    /// See `conf_ver`.
    pub version: u64,
    /// The log index (and its term) the data is the range's state as of.
    pub applied_index: u64,
    /// See `applied_index`.
    pub applied_term: u64,
    /// The node that took it.
    pub node_id: u64,
    /// When it was taken (wall clock of this program, ms since the Unix epoch).
    pub taken_unix_ms: u64,
    /// The data file, in the backup directory.
    pub file: String,
    /// Pairs, and bytes of keys plus values, in the file.
    pub keys: u64,
    /// See `keys`.
    pub bytes: u64,
    /// The file's size in bytes.
    pub file_bytes: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
}

impl RangeEntry {
    /// The data file's name for range `id` at `version`, taken at `applied_index`: one
    /// name per point, so two points of a range never share a file.
    pub fn file_name(id: u64, version: u64, applied_index: u64) -> String {
        format!("r{id}-v{version}-i{applied_index}.chunks")
    }
}

/// Keys as hex strings in the manifest.
mod hex {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::from_hex(&s).ok_or_else(|| D::Error::custom(format!("{s:?} is not hex")))
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks that `ranges` (id, start, end) are disjoint and cover the key space: sorted by
/// start key, each starts where the previous ended, from the empty start to the empty end.
///
/// # Errors
///
/// `Overlap`, `Gap` or `EmptyInterval`, for the first place where the tiling breaks.
pub fn check_tiling<'a>(ranges: impl IntoIterator<Item = (u64, &'a [u8], &'a [u8])>) -> Result<()> {
    let mut sorted: Vec<(u64, &[u8], &[u8])> = ranges.into_iter().collect();
    sorted.sort_by(|a, b| a.1.cmp(b.1));
    // Where the next range must start, and the range that ended there (`None`: the start of
    // the key space, or past its end).
    let mut next: Option<&[u8]> = Some(b"");
    let mut previous = 0;
    for (id, start, end) in sorted {
        if !end.is_empty() && start >= end {
            return Err(BackupError::EmptyInterval {
                range: id,
                start: show_bytes(start),
                end: show_bytes(end),
            });
        }
        match next {
            None => {
                return Err(BackupError::Overlap {
                    left: previous,
                    right: id,
                    at: show_bytes(start),
                })
            }
            Some(n) if start < n => {
                return Err(BackupError::Overlap {
                    left: previous,
                    right: id,
                    at: show_bytes(start),
                })
            }
            Some(n) if start > n => {
                return Err(BackupError::Gap {
                    from: show_bytes(n),
                    to: show_bytes(start),
                })
            }
            Some(_) => {}
        }
        next = (!end.is_empty()).then_some(end);
        previous = id;
    }
    match next {
        None => Ok(()),
        Some(n) => Err(BackupError::Gap {
            from: show_bytes(n),
            to: String::new(),
        }),
    }
}

/// Makes `dir` ready for a backup: created if missing, refused if it holds anything.
///
/// # Errors
///
/// `DirNotEmpty`, `NotADirectory`, `Io`.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(BackupError::NotADirectory(dir.to_path_buf())),
        Ok(_) => {
            let entries = std::fs::read_dir(dir).map_err(io(dir))?.count();
            if entries > 0 {
                return Err(BackupError::DirNotEmpty {
                    dir: dir.to_path_buf(),
                    entries,
                });
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(dir)(e)),
    }
    std::fs::create_dir_all(dir).map_err(io(dir))
}

/// Writes the manifest (to a temporary name, synced, then renamed: a directory has a
/// manifest only once the backup is complete).
///
/// # Errors
///
/// `Io`.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = dir.join(MANIFEST);
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serializes");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&json).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Reads and checks a backup before anything uses it: the manifest parses and is consistent
/// (format, version, totals, file names), its ranges tile the key space, and every data file
/// is there with the size, checksum, keys and bytes the manifest gives, its pairs in order
/// and inside its range.
///
/// # Errors
///
/// The first problem found, as a [`BackupError`].
pub fn verify(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(BackupError::ManifestMissing(dir.to_path_buf()))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let invalid = |reason: String| BackupError::ManifestInvalid {
        path: path.clone(),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if manifest.format != FORMAT || manifest.version != FORMAT_VERSION {
        return Err(invalid(format!(
            "format {:?} version {}: this program reads {FORMAT:?} version {FORMAT_VERSION}",
            manifest.format, manifest.version
        )));
    }
    let mut names = BTreeMap::new();
    for r in &manifest.ranges {
        let plain = Path::new(&r.file)
            .file_name()
            .is_some_and(|n| n == r.file.as_str());
        if !plain || r.file == MANIFEST {
            return Err(invalid(format!(
                "r{}: bad file name {:?}",
                r.range_id, r.file
            )));
        }
        if let Some(other) = names.insert(r.file.as_str(), r.range_id) {
            return Err(invalid(format!(
                "r{other} and r{} share the file {}",
                r.range_id, r.file
            )));
        }
    }
    check_tiling(
        manifest
            .ranges
            .iter()
            .map(|r| (r.range_id, &r.start_key[..], &r.end_key[..])),
    )?;
    let (keys, bytes) = manifest
        .ranges
        .iter()
        .fold((0, 0), |(k, b), r| (k + r.keys, b + r.bytes));
    if (keys, bytes) != (manifest.keys, manifest.bytes) {
        return Err(invalid(format!(
            "totals {} keys, {} bytes; the ranges add up to {keys} keys, {bytes} bytes",
            manifest.keys, manifest.bytes
        )));
    }
    for r in &manifest.ranges {
        verify_file(dir, r)?;
    }
    Ok(manifest)
}

/// Reads one data file and compares it with its entry: first its bytes (size, checksum),
/// then its chunks (they decode, keys in order and inside the range, counts).
fn verify_file(dir: &Path, entry: &RangeEntry) -> Result<()> {
    let file = dir.join(&entry.file);
    let (file_bytes, crc) = checksum(&file)?;
    if crc != entry.crc32 {
        return Err(BackupError::Checksum {
            file,
            expected: entry.crc32,
            found: crc,
        });
    }
    let count = |what, expected, found| BackupError::Count {
        file: file.clone(),
        what,
        expected,
        found,
    };
    if file_bytes != entry.file_bytes {
        return Err(count("file size", entry.file_bytes, file_bytes));
    }
    let mut reader = DataReader::open(dir, entry)?;
    let mut order = KeyOrder::new(&entry.start_key, &entry.end_key);
    loop {
        let corrupt = |reason| BackupError::Corrupt {
            file: file.clone(),
            reason,
        };
        match reader.next_chunk() {
            Ok(Some(c)) => order.add(&c).map_err(corrupt)?,
            Ok(None) => break,
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::Corrupt(why)) => return Err(corrupt(why)),
        }
    }
    if order.keys != entry.keys {
        return Err(count("keys", entry.keys, order.keys));
    }
    if order.bytes != entry.bytes {
        return Err(count("bytes", entry.bytes, order.bytes));
    }
    Ok(())
}

/// A file's size and CRC-32.
fn checksum(file: &Path) -> Result<(u64, u32)> {
    let mut input = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(BackupError::FileMissing {
                file: file.to_path_buf(),
            })
        }
        Err(e) => return Err(io(file)(e)),
    };
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0; 1 << 16];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok((size, crc.finalize())),
            Ok(n) => {
                crc.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io(file)(e)),
        }
    }
}

/// Pairs of a range's chunks: in strictly ascending key order, inside `[start, end)`;
/// counts them.
#[derive(Debug)]
pub struct KeyOrder {
    start: Vec<u8>,
    end: Vec<u8>,
    last: Option<Bytes>,
    /// Pairs so far.
    pub keys: u64,
    /// Bytes of keys and values so far.
    pub bytes: u64,
}

impl KeyOrder {
    /// For the range `[start, end)`.
    pub fn new(start: &[u8], end: &[u8]) -> KeyOrder {
        KeyOrder {
            start: start.to_vec(),
            end: end.to_vec(),
            last: None,
            keys: 0,
            bytes: 0,
        }
    }

    /// Checks and counts `chunk`'s pairs.
    ///
    /// # Errors
    ///
    /// Which key is out of order or outside the range.
    pub fn add(&mut self, chunk: &SnapshotChunk) -> std::result::Result<(), String> {
        for p in &chunk.pairs {
            let k = &p.key[..];
            if k < &self.start[..] || (!self.end.is_empty() && k >= &self.end[..]) {
                return Err(format!("key {:?} is outside the range", show_bytes(k)));
            }
            if self.last.as_ref().is_some_and(|l| &l[..] >= k) {
                return Err(format!("key {:?} is out of order", show_bytes(k)));
            }
            self.last = Some(p.key.clone());
            self.keys += 1;
            self.bytes += (p.key.len() + p.value.len()) as u64;
        }
        Ok(())
    }
}

/// What a data file's writer reports when it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSummary {
    /// Pairs, and bytes of keys plus values.
    pub keys: u64,
    /// See `keys`.
    pub bytes: u64,
    /// The file's size.
    pub file_bytes: u64,
    /// Its CRC-32.
    pub crc32: u32,
}

/// Writes one range's data file: chunks appended length-delimited, checked (order, range),
/// counted and checksummed; under a temporary name until [`DataWriter::finish`]. Dropped
/// before that (a stream broke, the backup gave up), it removes its temporary file.
#[derive(Debug)]
pub struct DataWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    order: KeyOrder,
    file_bytes: u64,
    finished: bool,
}

impl DataWriter {
    /// Starts the file `name` in `dir` for the range `[start, end)`.
    ///
    /// # Errors
    ///
    /// `Io`.
    pub fn create(dir: &Path, name: &str, start: &[u8], end: &[u8]) -> Result<DataWriter> {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let out = BufWriter::new(File::create(&tmp).map_err(io(&tmp))?);
        Ok(DataWriter {
            path,
            tmp,
            out,
            crc: crc32fast::Hasher::new(),
            order: KeyOrder::new(start, end),
            file_bytes: 0,
            finished: false,
        })
    }

    /// Appends `chunk`.
    ///
    /// # Errors
    ///
    /// `Corrupt` if a key is out of order or outside the range (the node sent a bad
    /// stream), `Io`.
    pub fn write_chunk(&mut self, chunk: &SnapshotChunk) -> Result<()> {
        self.order
            .add(chunk)
            .map_err(|reason| BackupError::Corrupt {
                file: self.path.clone(),
                reason: format!("the node sent {reason}"),
            })?;
        let buf = chunk.encode_length_delimited_to_vec();
        self.crc.update(&buf);
        self.file_bytes += buf.len() as u64;
        self.out.write_all(&buf).map_err(io(&self.tmp))
    }

    /// Pairs and bytes written so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.order.keys, self.order.bytes)
    }

    /// Flushes and syncs the file and gives it its name.
    ///
    /// # Errors
    ///
    /// `Io`.
    pub fn finish(mut self) -> Result<FileSummary> {
        self.out.flush().map_err(io(&self.tmp))?;
        self.out.get_ref().sync_all().map_err(io(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        self.finished = true;
        Ok(FileSummary {
            keys: self.order.keys,
            bytes: self.order.bytes,
            file_bytes: self.file_bytes,
            crc32: self.crc.clone().finalize(),
        })
    }
}

impl Drop for DataWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Why a data file's next chunk could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The file could not be read.
    Io(BackupError),
    /// The bytes are not a chunk (damaged or truncated).
    Corrupt(String),
}

/// Reads one range's data file chunk by chunk.
#[derive(Debug)]
pub struct DataReader {
    /// The file.
    pub file: PathBuf,
    input: BufReader<File>,
    /// Bytes read so far.
    offset: u64,
}

impl DataReader {
    /// Opens `entry`'s file in `dir`.
    ///
    /// # Errors
    ///
    /// `FileMissing`, `Io`.
    pub fn open(dir: &Path, entry: &RangeEntry) -> Result<DataReader> {
        let file = dir.join(&entry.file);
        let input = match File::open(&file) {
            Ok(f) => BufReader::with_capacity(1 << 20, f),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(BackupError::FileMissing { file })
            }
            Err(e) => return Err(io(&file)(e)),
        };
        Ok(DataReader {
            file,
            input,
            offset: 0,
        })
    }

    /// The next chunk; `None` at the end of the file.
    ///
    /// # Errors
    ///
    /// `Io`, or `Corrupt` for bytes that are not a length-delimited chunk.
    pub fn next_chunk(&mut self) -> std::result::Result<Option<SnapshotChunk>, ReadError> {
        let at = self.offset;
        let Some(len) = self.read_len()? else {
            return Ok(None);
        };
        if len > MAX_CHUNK_BYTES {
            return Err(ReadError::Corrupt(format!(
                "a chunk of {len} bytes at offset {at}: a damaged length"
            )));
        }
        let mut buf = vec![0; len as usize];
        match self.input.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return Err(ReadError::Corrupt(format!(
                    "the file ends inside the chunk at offset {at}"
                )))
            }
            Err(e) => return Err(ReadError::Io(io(&self.file)(e))),
        }
        self.offset += len;
        SnapshotChunk::decode(&buf[..]).map(Some).map_err(|e| {
            ReadError::Corrupt(format!("the chunk at offset {at} does not decode: {e}"))
        })
    }

    /// A chunk's length (a varint); `None` at the end of the file.
    fn read_len(&mut self) -> std::result::Result<Option<u64>, ReadError> {
        let mut value = 0u64;
        for i in 0..10 {
            let mut b = [0u8; 1];
            match self.input.read_exact(&mut b) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof && i == 0 => return Ok(None),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    return Err(ReadError::Corrupt(
                        "the file ends inside a chunk's length".into(),
                    ))
                }
                Err(e) => return Err(ReadError::Io(io(&self.file)(e))),
            }
            self.offset += 1;
            value |= u64::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                return Ok(Some(value));
            }
        }
        Err(ReadError::Corrupt(
            "a chunk's length is not a varint".into(),
        ))
    }
}

#[cfg(test)]
mod tests;

//! The backup format's checks on real files: each kind of damage gives its own error.

use flotilla_proto::meta::KvPair;

use super::*;

fn chunk(keys: &[&str]) -> SnapshotChunk {
    SnapshotChunk {
        pairs: keys
            .iter()
            .map(|k| KvPair {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Bytes::from(format!("value of {k}")),
            })
            .collect(),
    }
}

/// A backup of two ranges, ["", "m") and ["m", ""), written as the backup writes one.
fn write_backup(dir: &Path) -> Manifest {
    prepare_dir(dir).unwrap();
    let mut ranges = Vec::new();
    for (id, start, end, chunks) in [
        (1, "", "m", vec![chunk(&["a", "b"]), chunk(&["c"])]),
        (7, "m", "", vec![chunk(&["m", "x"])]),
    ] {
        let file = RangeEntry::file_name(id, 2, 10);
        let mut w = DataWriter::create(dir, &file, start.as_bytes(), end.as_bytes()).unwrap();
        for c in &chunks {
            w.write_chunk(c).unwrap();
        }
        let s = w.finish().unwrap();
        ranges.push(RangeEntry {
            range_id: id,
            start_key: start.into(),
            end_key: end.into(),
            conf_ver: 1,
            version: 2,
            applied_index: 10,
            applied_term: 5,
            node_id: 1,
            taken_unix_ms: 1,
            file,
            keys: s.keys,
            bytes: s.bytes,
            file_bytes: s.file_bytes,
            crc32: s.crc32,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        started_unix_ms: 1,
        finished_unix_ms: 2,
        source: Source {
            endpoints: vec!["127.0.0.1:1".into()],
            node_ids: vec![1],
        },
        keys: ranges.iter().map(|r| r.keys).sum(),
        bytes: ranges.iter().map(|r| r.bytes).sum(),
        ranges,
    };
    write_manifest(dir, &manifest).unwrap();
    manifest
}

fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let mut m: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
    edit(&mut m);
    write_manifest(dir, &m).unwrap();
}

#[test]
fn a_written_backup_verifies_and_reads_back_its_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    let written = write_backup(&dir);
    assert_eq!(verify(&dir).unwrap(), written);
    assert_eq!(written.keys, 5);
    let mut keys = Vec::new();
    for r in &written.ranges {
        let mut reader = DataReader::open(&dir, r).unwrap();
        while let Some(c) = reader.next_chunk().unwrap() {
            keys.extend(c.pairs.iter().map(|p| p.key.to_vec()));
        }
    }
    assert_eq!(keys, [&b"a"[..], b"b", b"c", b"m", b"x"]);
    // Keys are hex in the manifest.
    let text = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
    assert!(text.contains("\"start_key\": \"6d\""), "{text}");
}

#[test]
fn a_damaged_file_is_refused_by_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    let m = write_backup(&dir);
    let file = dir.join(&m.ranges[0].file);
    let mut bytes = std::fs::read(&file).unwrap();
    // A value's byte: the file still decodes, only the checksum tells.
    let at = bytes.len() - 2;
    bytes[at] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, BackupError::Checksum { .. }), "{err}");
    // A damaged length: the checksum is what is reported, before decoding.
    bytes[at] ^= 0x20;
    bytes[0] = 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, BackupError::Checksum { .. }), "{err}");
    // A truncated file.
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        verify(&dir).unwrap_err(),
        BackupError::Checksum { .. }
    ));
}

#[test]
fn a_missing_file_or_manifest_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    let m = write_backup(&dir);
    std::fs::remove_file(dir.join(&m.ranges[1].file)).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(&err, BackupError::FileMissing { file } if file.ends_with(&m.ranges[1].file)),
        "{err}"
    );
    std::fs::remove_file(dir.join(MANIFEST)).unwrap();
    assert!(matches!(
        verify(&dir).unwrap_err(),
        BackupError::ManifestMissing(_)
    ));
}

#[test]
fn ranges_that_overlap_or_leave_a_gap_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    write_backup(&dir);
    // r7 starts inside r1.
    rewrite_manifest(&dir, |m| m.ranges[1].start_key = b"k".to_vec());
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(
            err,
            BackupError::Overlap {
                left: 1,
                right: 7,
                ..
            }
        ),
        "{err}"
    );
    // r7 starts after r1's end: keys of [m, n) are in no range.
    rewrite_manifest(&dir, |m| m.ranges[1].start_key = b"n".to_vec());
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, BackupError::Gap { .. }), "{err}");
    // The last range does not reach the end of the key space.
    rewrite_manifest(&dir, |m| {
        m.ranges[1].start_key = b"m".to_vec();
        m.ranges[1].end_key = b"y".to_vec();
    });
    assert!(matches!(verify(&dir).unwrap_err(), BackupError::Gap { .. }));
    // Two ranges to the end of the key space.
    assert!(matches!(
        check_tiling([(1, &b""[..], &b""[..]), (2, &b"a"[..], &b""[..])]),
        Err(BackupError::Overlap { .. })
    ));
    assert!(matches!(
        check_tiling([(1, &b""[..], &b"b"[..]), (2, &b"b"[..], &b"a"[..])]),
        Err(BackupError::EmptyInterval { range: 2, .. })
    ));
    assert!(check_tiling([(1, &b""[..], &b""[..])]).is_ok());
    assert!(matches!(
        check_tiling(std::iter::empty()),
        Err(BackupError::Gap { .. })
    ));
}

#[test]
fn a_manifest_that_disagrees_with_its_files_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    write_backup(&dir);
    // A key count that the file does not have (the totals adjusted alike).
    rewrite_manifest(&dir, |m| {
        m.ranges[0].keys += 1;
        m.keys += 1;
    });
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(err, BackupError::Count { what: "keys", .. }),
        "{err}"
    );
    // Totals that the ranges do not add up to.
    rewrite_manifest(&dir, |m| m.ranges[0].keys -= 1);
    assert!(matches!(
        verify(&dir).unwrap_err(),
        BackupError::ManifestInvalid { .. }
    ));
    // A file name that leaves the directory.
    rewrite_manifest(&dir, |m| {
        m.keys -= 1;
        m.ranges[0].file = "../elsewhere".into();
    });
    assert!(matches!(
        verify(&dir).unwrap_err(),
        BackupError::ManifestInvalid { .. }
    ));
    std::fs::write(dir.join(MANIFEST), b"{ not json").unwrap();
    assert!(matches!(
        verify(&dir).unwrap_err(),
        BackupError::ManifestInvalid { .. }
    ));
}

#[test]
fn a_backup_is_written_only_into_a_new_or_empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new");
    prepare_dir(&dir).unwrap();
    prepare_dir(&dir).unwrap();
    std::fs::write(dir.join("something"), b"x").unwrap();
    let err = prepare_dir(&dir).unwrap_err();
    assert!(
        matches!(err, BackupError::DirNotEmpty { entries: 1, .. }),
        "{err}"
    );
    let file = dir.join("something");
    assert!(matches!(
        prepare_dir(&file).unwrap_err(),
        BackupError::NotADirectory(_)
    ));
}

#[test]
fn a_stream_out_of_order_or_outside_its_range_is_not_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = DataWriter::create(tmp.path(), "f", b"b", b"d").unwrap();
    w.write_chunk(&chunk(&["b", "c"])).unwrap();
    assert!(matches!(
        w.write_chunk(&chunk(&["c"])),
        Err(BackupError::Corrupt { .. })
    ));
    assert!(matches!(
        w.write_chunk(&chunk(&["d"])),
        Err(BackupError::Corrupt { .. })
    ));
    drop(w);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn hex_round_trips() {
    assert_eq!(to_hex(b"\x00\xffab"), "00ff6162");
    assert_eq!(from_hex("00ff6162").unwrap(), b"\x00\xffab");
    assert_eq!(from_hex("0"), None);
    assert_eq!(from_hex("zz"), None);
    assert_eq!(from_hex(""), Some(vec![]));
}

#[test]
fn a_file_that_does_not_decode_is_corrupt_even_with_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    let m = write_backup(&dir);
    // Written so (the checksum matches): a length past the end of the file.
    let garbage = [0x05, 0x0a, 0x01];
    std::fs::write(dir.join(&m.ranges[0].file), garbage).unwrap();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&garbage);
    let crc = crc.finalize();
    rewrite_manifest(&dir, |m| {
        m.ranges[0].crc32 = crc;
        m.ranges[0].file_bytes = garbage.len() as u64;
    });
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
}

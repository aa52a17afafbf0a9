//! How results are printed: `--output table` (aligned columns for people) or `--output json`
//! (one JSON document on stdout for scripts). Keys and values are shown as text, with bytes
//! that are not printable ASCII escaped (`\xNN`).

use clap::ValueEnum;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

/// `bytes` as printable text.
pub fn show_bytes(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// A range's end key: empty means the end of the key space.
pub fn show_end(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "(end)".into()
    } else {
        show_bytes(bytes)
    }
}

/// A range's start key: empty means the start of the key space.
pub fn show_start(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "(start)".into()
    } else {
        show_bytes(bytes)
    }
}

/// A byte count as people read it (KiB, MiB, GiB).
pub fn show_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Prints `rows` under `header` in columns as wide as their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_keys_are_shown_readably() {
        assert_eq!(show_size(512), "512 B");
        assert_eq!(show_size(1536), "1.5 KiB");
        assert_eq!(show_size(3 << 20), "3.0 MiB");
        assert_eq!(show_bytes(b"k\x00\xff"), "k\\x00\\xff");
        assert_eq!(show_end(b""), "(end)");
    }
}

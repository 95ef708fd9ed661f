//! The records of a JSON array or a JSON Lines file, read one at a time from a [`BufRead`]:
//! memory holds one record's bytes, never the file or a JSON tree of it.
//!
//! Records come back unparsed, so a record with invalid UTF-8 or bad JSON costs that record
//! alone. A JSON array is split into its elements by a byte scanner that tracks strings and
//! nesting; a file cut off (or damaged) inside an element still yields every whole element before
//! it, then one [`Item::CutOff`] for the tail (an element whose brackets have closed is whole,
//! even if the file ends before the `,` after it). A record is ended by a `,` or `]` outside any
//! string and any nesting, so a stray `}` spoils only the record it is in, while an unclosed `{`
//! or `"` runs to the end of the file and becomes the cut tail.

use std::io::{self, BufRead};

/// The most bytes of one record held in memory. A longer one (a damaged file whose brackets never
/// close, or a file that is not line-delimited read as JSONL) is scanned to its end and reported
/// as [`Item::Oversized`] without its bytes, so memory stays bounded on any input. Ordinary
/// ShareGPT records are kilobytes; a single 150 MB message still fits.
pub const MAX_RECORD_BYTES: u64 = 256 << 20;

/// Where a record starts: its index among the file's records, and its first byte as a 0-based
/// offset and a 1-based line and column (in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub index: usize,
    pub byte: u64,
    pub line: u64,
    pub column: u64,
}

/// One step of the reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A whole record (a JSON array element, or a non-blank JSONL line) as it is in the file.
    Record { at: Position, bytes: Vec<u8> },
    /// A record of `len` bytes, past the reader's limit ([`MAX_RECORD_BYTES`]): scanned over,
    /// not kept.
    Oversized { at: Position, len: u64 },
    /// The file ends (at byte `end`) inside the JSON array: inside the record starting at `at`,
    /// or, when `at.byte == end`, between records before the closing `]`. Always the last item.
    CutOff { at: Position, end: u64 },
    /// Something other than white space after the array's closing `]`. Always the last item.
    Trailing { at: Position },
}

/// The shape of a file, told by its first non-blank byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A JSON array: `[` first.
    Array,
    /// Anything else: one JSON record per line.
    Lines,
}

/// A byte stream with the position of its next byte.
struct Cursor<R> {
    input: R,
    byte: u64,
    line: u64,
    line_start: u64,
}

impl<R: BufRead> Cursor<R> {
    fn new(input: R) -> Self {
        Cursor {
            input,
            byte: 0,
            line: 1,
            line_start: 0,
        }
    }

    fn position(&self, index: usize) -> Position {
        Position {
            index,
            byte: self.byte,
            line: self.line,
            column: self.byte - self.line_start + 1,
        }
    }

    /// Skips bytes while `skip` holds; returns the first other byte (not consumed), or None at
    /// the end of the input.
    fn skip_while(&mut self, skip: impl Fn(u8) -> bool) -> io::Result<Option<u8>> {
        loop {
            let buf = self.input.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let stop = buf.iter().position(|&b| !skip(b));
            let taken = stop.unwrap_or(buf.len());
            let next = stop.map(|i| buf[i]);
            count_lines(
                &buf[..taken],
                self.byte,
                &mut self.line,
                &mut self.line_start,
            );
            self.byte += taken as u64;
            self.input.consume(taken);
            if next.is_some() {
                return Ok(next);
            }
        }
    }

    /// Consumes one byte already seen by `skip_while` (not a newline).
    fn step(&mut self) {
        self.byte += 1;
        self.input.consume(1);
    }

    /// Reads one record up to (not including) the first byte `ends` accepts, keeping at most
    /// `limit` bytes of it. `ends` sees every byte in order and may keep state (a
    /// scanner's nesting). Returns the bytes (None when past the limit), the record's length, and
    /// whether an ending byte was found before the end of the input.
    fn read_record(
        &mut self,
        limit: u64,
        mut ends: impl FnMut(u8) -> bool,
    ) -> io::Result<(Option<Vec<u8>>, u64, bool)> {
        let (mut kept, mut len) = (Some(Vec::new()), 0u64);
        loop {
            let buf = self.input.fill_buf()?;
            if buf.is_empty() {
                return Ok((kept, len, false));
            }
            let end = buf.iter().position(|&b| ends(b));
            let taken = end.unwrap_or(buf.len());
            len += taken as u64;
            if len > limit {
                kept = None;
            }
            if let Some(bytes) = kept.as_mut() {
                bytes.extend_from_slice(&buf[..taken]);
            }
            count_lines(
                &buf[..taken],
                self.byte,
                &mut self.line,
                &mut self.line_start,
            );
            self.byte += taken as u64;
            self.input.consume(taken);
            if end.is_some() {
                return Ok((kept, len, true));
            }
        }
    }
}

/// Nesting and string state of the JSON-array scanner.
#[derive(Default)]
struct Nesting {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The bracket that opened the element's outermost object or array.
    opener: u8,
    /// That object or array was closed again by its own kind of bracket: the element is whole
    /// even if the file ends before the `,` that would follow it. (A record that lost its `}`
    /// is closed, if at all, by the list's `]`, and stays not whole.)
    closed: bool,
}

impl Nesting {
    /// Whether `b` ends the current element: a `,` or `]` outside strings and nesting.
    fn ends_element(&mut self, b: u8) -> bool {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        match b {
            b'"' => self.in_string = true,
            b'[' | b'{' => {
                if self.depth == 0 {
                    self.opener = b;
                }
                self.depth += 1;
            }
            b']' | b'}' if self.depth > 0 => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.closed =
                        (self.opener, b) == (b'{', b'}') || (self.opener, b) == (b'[', b']');
                }
            }
            b',' | b']' if self.depth == 0 => return true,
            _ => {}
        }
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening `[`, or before the first line.
    Start,
    /// Inside the array (or the lines), between records.
    Between,
    /// After the array's closing `]`.
    Closed,
    Done,
}

/// The records of a JSON array or JSON Lines input, in order. I/O errors end the iteration
/// with an `Err`; everything else the file holds comes back as an [`Item`].
pub struct JsonRecords<R> {
    cursor: Cursor<R>,
    layout: Option<Layout>,
    state: State,
    index: usize,
    limit: u64,
}

impl<R: BufRead> JsonRecords<R> {
    pub fn new(input: R) -> Self {
        Self::with_record_limit(input, MAX_RECORD_BYTES)
    }

    /// A reader that keeps at most `limit` bytes of one record (tests; see [`MAX_RECORD_BYTES`]).
    pub fn with_record_limit(input: R, limit: u64) -> Self {
        JsonRecords {
            cursor: Cursor::new(input),
            layout: None,
            state: State::Start,
            index: 0,
            limit,
        }
    }

    /// The input's layout (reads up to its first non-blank byte); `Lines` for an empty input.
    pub fn layout(&mut self) -> io::Result<Layout> {
        if let Some(layout) = self.layout {
            return Ok(layout);
        }
        let first = self.cursor.skip_while(|b| b.is_ascii_whitespace())?;
        let layout = if first == Some(b'[') {
            self.cursor.step();
            Layout::Array
        } else {
            Layout::Lines
        };
        self.layout = Some(layout);
        self.state = State::Between;
        Ok(layout)
    }

    /// Bytes read so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.cursor.byte
    }

    fn next_item(&mut self) -> io::Result<Option<Item>> {
        let layout = self.layout()?;
        match (self.state, layout) {
            (State::Done, _) | (State::Start, _) => Ok(None),
            (State::Between, Layout::Lines) => self.next_line(),
            (State::Between, Layout::Array) => self.next_element(),
            (State::Closed, _) => self.after_array(),
        }
    }

    fn next_line(&mut self) -> io::Result<Option<Item>> {
        // Blank lines (and the white space before a record) are skipped, not counted.
        let Some(_) = self.cursor.skip_while(|b| b.is_ascii_whitespace())? else {
            self.state = State::Done;
            return Ok(None);
        };
        let at = self.cursor.position(self.index);
        let (bytes, len, _) = self.cursor.read_record(self.limit, |b| b == b'\n')?;
        self.index += 1;
        Ok(Some(record_or_oversized(at, bytes, len)))
    }

    fn next_element(&mut self) -> io::Result<Option<Item>> {
        let next = self
            .cursor
            .skip_while(|b| b.is_ascii_whitespace() || b == b',')?;
        let at = self.cursor.position(self.index);
        match next {
            None => {
                self.state = State::Done;
                Ok(Some(Item::CutOff { at, end: at.byte }))
            }
            Some(b']') => {
                self.cursor.step();
                self.state = State::Closed;
                self.after_array()
            }
            Some(_) => {
                let mut nesting = Nesting::default();
                let (bytes, len, ended) = self
                    .cursor
                    .read_record(self.limit, |b| nesting.ends_element(b))?;
                self.index += 1;
                let whole = nesting.closed && nesting.depth == 0 && !nesting.in_string;
                if !ended && !whole {
                    self.state = State::Done;
                    return Ok(Some(Item::CutOff {
                        at,
                        end: self.cursor.byte,
                    }));
                }
                Ok(Some(record_or_oversized(at, bytes, len)))
            }
        }
    }

    fn after_array(&mut self) -> io::Result<Option<Item>> {
        let next = self.cursor.skip_while(|b| b.is_ascii_whitespace())?;
        self.state = State::Done;
        Ok(next.map(|_| Item::Trailing {
            at: self.cursor.position(self.index),
        }))
    }
}

/// Counts the line ends in `bytes`, which start at offset `base`.
fn count_lines(bytes: &[u8], base: u64, line: &mut u64, line_start: &mut u64) {
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            *line += 1;
            *line_start = base + i as u64 + 1;
        }
    }
}

fn record_or_oversized(at: Position, bytes: Option<Vec<u8>>, len: u64) -> Item {
    match bytes {
        Some(bytes) => Item::Record { at, bytes },
        None => Item::Oversized { at, len },
    }
}

impl<R: BufRead> Iterator for JsonRecords<R> {
    type Item = io::Result<Item>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_item() {
            Ok(item) => item.map(Ok),
            Err(err) => {
                self.state = State::Done;
                Some(Err(err))
            }
        }
    }
}

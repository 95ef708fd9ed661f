//! GGUF v2/v3 reader: llama.cpp's model file format (metadata, tensor table, data offsets).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;

use crate::formats::dequant::{dequantize, GgmlType};

const MAGIC: &[u8; 4] = b"GGUF";
/// Used when `general.alignment` is absent (GGUF spec default).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value. GGUF arrays are homogeneous, but a `Vec<Value>` keeps the reader simple.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer type that fits in i64 (GGUF writers are not consistent about u32 vs i32 vs u64).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers as floats.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }
}

/// One entry of the tensor-info table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, i.e. reversed torch shape.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The torch/safetensors shape (outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Bytes of data, when the type's block layout is known.
    pub fn byte_len(&self) -> Option<u64> {
        let (block_elems, block_bytes) = self.ggml_type.block_layout()?;
        Some(self.n_elements() / block_elems as u64 * block_bytes as u64)
    }
}

/// An opened (memory-mapped) GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// In file order (the order matters for nothing we do, but keeps dumps readable).
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_start: u64,
    mmap: Mmap,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("opening GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; we assume nobody truncates the model file while we read it.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping GGUF file {}", path.display()))?;
        Self::parse(path, mmap).with_context(|| format!("reading GGUF file {}", path.display()))
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut cur = Cursor { buf: &mmap, pos: 0 };
        let magic = cur.take(4).context("reading the magic")?;
        ensure!(
            magic == MAGIC,
            "not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""
        );
        let version = cur.u32().context("reading the version")?;
        // v1 used 32-bit counts and lengths; v2 and v3 share the layout read here.
        ensure!(
            version == 2 || version == 3,
            "unsupported GGUF version {version} (need 2 or 3)"
        );
        let tensor_count = cur.u64().context("reading tensor_count")?;
        let kv_count = cur.u64().context("reading kv_count")?;

        let mut metadata = Vec::new();
        for i in 0..kv_count {
            let key = cur
                .string()
                .with_context(|| format!("reading the key of metadata entry {i}"))?;
            let ty = cur
                .u32()
                .with_context(|| format!("reading the type of metadata key {key}"))?;
            let value = cur
                .value(ty)
                .with_context(|| format!("reading metadata key {key}"))?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => {
                let a = v.as_i64().ok_or_else(|| {
                    anyhow!("general.alignment is a {}, not an integer", v.type_name())
                })?;
                ensure!(
                    a > 0 && (a as u64).is_power_of_two(),
                    "general.alignment {a} is not a power of two"
                );
                a as u64
            }
        };

        let mut tensors = Vec::new();
        for i in 0..tensor_count {
            tensors.push(
                cur.tensor_info()
                    .with_context(|| format!("reading tensor info {i}"))?,
            );
        }
        let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;

        let file = GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            metadata,
            tensors,
            data_start,
            mmap,
        };
        for info in &file.tensors {
            file.check_extent(info)?;
        }
        Ok(file)
    }

    /// Checks what can be checked without dequantizing: alignment, block divisibility, bounds.
    fn check_extent(&self, info: &TensorInfo) -> Result<()> {
        let name = &info.name;
        ensure!(
            info.offset.is_multiple_of(self.alignment),
            "tensor {name}: data offset {} is not a multiple of the alignment {}",
            info.offset,
            self.alignment
        );
        let Some((block_elems, _)) = info.ggml_type.block_layout() else {
            return Ok(());
        };
        let inner = info.dims.first().copied().unwrap_or(1);
        ensure!(
            inner % block_elems as u64 == 0,
            "tensor {name}: innermost dimension {inner} is not a multiple of the {} block size {block_elems}",
            info.ggml_type.name()
        );
        let len = info.byte_len().unwrap_or(0);
        let end = self
            .data_start
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(len));
        ensure!(
            end.is_some_and(|e| e <= self.mmap.len() as u64),
            "tensor {name}: data [{}+{}, {len} bytes] runs past the end of the file ({} bytes)",
            self.data_start,
            info.offset,
            self.mmap.len()
        );
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    anyhow!(
                        "metadata key {key} is a {}, expected a string",
                        v.type_name()
                    )
                })
            })
            .transpose()
    }

    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    anyhow!(
                        "metadata key {key} is a {}, expected an integer",
                        v.type_name()
                    )
                })
            })
            .transpose()
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    anyhow!(
                        "metadata key {key} is a {}, expected a number",
                        v.type_name()
                    )
                })
            })
            .transpose()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (still quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let len = info.byte_len().ok_or_else(|| {
            anyhow!(
                "tensor {} has type {}, whose block layout is unknown",
                info.name,
                info.ggml_type.name()
            )
        })?;
        let start = (self.data_start + info.offset) as usize;
        Ok(&self.mmap[start..start + len as usize])
    }

    /// Dequantizes a tensor to f32 in ggml (= torch row-major) element order.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = self
            .tensor_bytes(info)
            .with_context(|| format!("in {}", self.path.display()))?;
        dequantize(info.ggml_type, bytes, info.n_elements() as usize)
            .with_context(|| format!("tensor {} in {}", info.name, self.path.display()))
    }
}

/// Little-endian reader over the mapped file; every read is bounds-checked so a truncated or
/// corrupt file gives an error, never a panic or a huge allocation.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        ensure!(
            n <= left,
            "file truncated: need {n} bytes at offset {}, only {left} left",
            self.pos
        );
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length that must fit in what is left of the file (each element takes >= `min_elem` bytes).
    fn length(&mut self, min_elem: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        ensure!(
            n.saturating_mul(min_elem as u64) <= left,
            "length {n} at offset {} exceeds the {left} bytes left in the file",
            self.pos - 8
        );
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.length(1)?;
        let at = self.pos;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| anyhow!("string at offset {at} is not valid UTF-8: {e}"))
    }

    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("bool value {b} is neither 0 nor 1"),
            },
            8 => Value::String(self.string()?),
            9 => {
                let elem_ty = self.u32()?;
                ensure!(elem_ty != 9, "nested arrays are not supported");
                let n = self.length(value_min_size(elem_ty)?)?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(
                        self.value(elem_ty)
                            .with_context(|| format!("array element {i}"))?,
                    );
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let name = self.string().context("reading the tensor name")?;
        let n_dims = self
            .u32()
            .with_context(|| format!("tensor {name}: reading n_dims"))?;
        ensure!(
            n_dims <= MAX_DIMS,
            "tensor {name}: {n_dims} dimensions (ggml allows at most {MAX_DIMS})"
        );
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(
                self.u64()
                    .with_context(|| format!("tensor {name}: reading dims"))?,
            );
        }
        ensure!(
            dims.iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .is_some(),
            "tensor {name}: dims {dims:?} overflow"
        );
        let ggml_type = GgmlType(
            self.u32()
                .with_context(|| format!("tensor {name}: reading the type"))?,
        );
        let offset = self
            .u64()
            .with_context(|| format!("tensor {name}: reading the data offset"))?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }
}

/// Smallest encoded size of a value of metadata type `ty` (used to bound array lengths).
fn value_min_size(ty: u32) -> Result<usize> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        other => bail!("unknown array element type {other}"),
    })
}

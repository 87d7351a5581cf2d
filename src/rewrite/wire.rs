//! Schema-free reading and splicing of protobuf wire bytes.
//!
//! The rewrite never decodes a whole listener: it walks only the fields it needs with
//! [`FieldReader`] and copies every other byte as it is, unknown fields included. Every varint,
//! tag and length is checked against the bytes that are really there, so hostile input ends in a
//! [`WireProblem`], never in a panic or an out-of-bounds slice.

use std::fmt;
use std::ops::Range;

use serde::Serialize;

/// Deepest nesting of (deprecated) protobuf groups that the reader skips over. Groups are the
/// only structure the reader walks without knowing the schema, so this bounds that walk.
const MAX_GROUP_DEPTH: usize = 64;

/// The six wire types of the protobuf encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WireType {
    /// Base-128 varint (0).
    Varint,
    /// Eight little-endian bytes (1).
    Fixed64,
    /// Length-delimited bytes: strings, messages, packed fields (2).
    Len,
    /// Start of a deprecated group (3).
    StartGroup,
    /// End of a deprecated group (4).
    EndGroup,
    /// Four little-endian bytes (5).
    Fixed32,
}

impl fmt::Display for WireType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            WireType::Varint => "varint",
            WireType::Fixed64 => "fixed64",
            WireType::Len => "length-delimited",
            WireType::StartGroup => "start-group",
            WireType::EndGroup => "end-group",
            WireType::Fixed32 => "fixed32",
        };
        f.write_str(name)
    }
}

/// What was wrong with the bytes of a protobuf message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WireProblem {
    /// The bytes end inside a tag, a varint or a fixed-width value.
    Truncated,
    /// A varint runs past ten bytes or past 64 bits.
    VarintTooLong,
    /// A tag whose field number is 0 or does not fit in 29 bits.
    BadFieldNumber,
    /// A tag with wire type 6 or 7, which the encoding does not define.
    BadWireType(u8),
    /// A length prefix that points past the end of the enclosing message.
    LengthPastEnd {
        /// The length the prefix announced.
        length: u64,
        /// The bytes actually left in the enclosing message.
        available: usize,
    },
    /// An end-group tag without the matching start-group tag.
    UnmatchedEndGroup,
    /// Groups nested deeper than the reader follows.
    GroupsTooDeep,
    /// A field known to the schema arrived with another wire type.
    WrongWireType {
        /// The wire type the schema gives the field.
        expected: WireType,
        /// The wire type found in the bytes.
        found: WireType,
    },
    /// A `string` field that is not UTF-8.
    InvalidUtf8,
}

impl fmt::Display for WireProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireProblem::Truncated => f.write_str("the bytes end inside a field"),
            WireProblem::VarintTooLong => f.write_str("varint longer than 64 bits"),
            WireProblem::BadFieldNumber => f.write_str("tag with field number 0 or above 2^29-1"),
            WireProblem::BadWireType(wire) => write!(f, "tag with undefined wire type {wire}"),
            WireProblem::LengthPastEnd { length, available } => write!(
                f,
                "length prefix {length} runs past the end of the message ({available} bytes left)"
            ),
            WireProblem::UnmatchedEndGroup => f.write_str("end-group tag without a start-group"),
            WireProblem::GroupsTooDeep => {
                write!(f, "groups nested deeper than {MAX_GROUP_DEPTH} levels")
            }
            WireProblem::WrongWireType { expected, found } => {
                write!(f, "wire type {found} where the schema has {expected}")
            }
            WireProblem::InvalidUtf8 => f.write_str("string field is not valid UTF-8"),
        }
    }
}

/// A length-delimited value and where it sits in the outermost buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LenValue<'a> {
    /// The payload bytes.
    pub bytes: &'a [u8],
    /// Absolute offset of the length prefix (the varint after the tag).
    pub prefix_start: usize,
    /// Absolute offset of the first payload byte, which is also the end of the length prefix.
    pub payload_start: usize,
}

impl<'a> LenValue<'a> {
    /// Absolute span of the length prefix.
    pub fn prefix(&self) -> Range<usize> {
        self.prefix_start..self.payload_start
    }

    /// Absolute span of the payload.
    pub fn payload(&self) -> Range<usize> {
        self.payload_start..self.payload_start + self.bytes.len()
    }

    /// The payload as UTF-8, as a protobuf `string` requires.
    pub fn as_str(&self) -> Result<&'a str, WireProblem> {
        std::str::from_utf8(self.bytes).map_err(|_| WireProblem::InvalidUtf8)
    }

    /// A reader over the fields of the payload, keeping absolute offsets.
    pub fn fields(&self) -> FieldReader<'a> {
        FieldReader::new(self.bytes, self.payload_start)
    }
}

/// The value of one field as found on the wire.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    Varint(u64),
    Fixed64,
    Len(LenValue<'a>),
    Group,
    Fixed32,
}

/// One field of a message: its number and its value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Field<'a> {
    pub number: u32,
    pub value: Value<'a>,
}

impl<'a> Field<'a> {
    fn wire_type(&self) -> WireType {
        match self.value {
            Value::Varint(_) => WireType::Varint,
            Value::Fixed64 => WireType::Fixed64,
            Value::Len(_) => WireType::Len,
            Value::Group => WireType::StartGroup,
            Value::Fixed32 => WireType::Fixed32,
        }
    }

    /// The value of a length-delimited field, or the wire-type mismatch.
    pub fn len(&self) -> Result<LenValue<'a>, WireProblem> {
        match self.value {
            Value::Len(value) => Ok(value),
            _ => Err(WireProblem::WrongWireType {
                expected: WireType::Len,
                found: self.wire_type(),
            }),
        }
    }

    /// The value of a varint field, or the wire-type mismatch.
    pub fn varint(&self) -> Result<u64, WireProblem> {
        match self.value {
            Value::Varint(value) => Ok(value),
            _ => Err(WireProblem::WrongWireType {
                expected: WireType::Varint,
                found: self.wire_type(),
            }),
        }
    }

    /// The value of an `enum` (or `int32`) field. Such a field is a varint of which protobuf
    /// parsers keep the low 32 bits, as Envoy's does: `1` written with junk above bit 32 is
    /// still `1`, and a negative value arrives sign-extended to ten bytes.
    pub fn enumeration(&self) -> Result<i32, WireProblem> {
        self.varint().map(|value| value as u32 as i32)
    }

    /// The value of a `string` field.
    pub fn str(&self) -> Result<&'a str, WireProblem> {
        self.len()?.as_str()
    }
}

/// Iterates over the fields of one message, checking framing as it goes. After the first
/// problem it yields that problem once and then stops.
#[derive(Clone, Debug)]
pub(crate) struct FieldReader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
    failed: bool,
    /// Number of the field being read, once its tag was decoded.
    current: Option<u32>,
}

impl<'a> FieldReader<'a> {
    /// Reads the message `buf`, whose first byte sits at absolute offset `base`.
    pub fn new(buf: &'a [u8], base: usize) -> Self {
        FieldReader {
            buf,
            pos: 0,
            base,
            failed: false,
            current: None,
        }
    }

    /// The number of the field whose value was malformed, when the tag itself was readable.
    pub fn failed_field(&self) -> Option<u32> {
        self.current.filter(|_| self.failed)
    }

    #[inline(always)]
    fn read_field(&mut self) -> Result<Field<'a>, WireProblem> {
        // Nearly every field of a listener has a one-byte tag and is a varint or
        // length-delimited: decoded here without the general dispatch.
        if let Some(&key) = self.buf.get(self.pos)
            && (8..0x80).contains(&key)
        {
            let number = u32::from(key >> 3);
            match key & 7 {
                0 => {
                    self.pos += 1;
                    self.current = Some(number);
                    let value = read_varint(self.buf, &mut self.pos)?;
                    return Ok(Field {
                        number,
                        value: Value::Varint(value),
                    });
                }
                2 => {
                    self.pos += 1;
                    self.current = Some(number);
                    let prefix_start = self.pos;
                    let bytes = read_len(self.buf, &mut self.pos)?;
                    let payload_start = self.pos - bytes.len();
                    return Ok(Field {
                        number,
                        value: Value::Len(LenValue {
                            bytes,
                            prefix_start: self.base + prefix_start,
                            payload_start: self.base + payload_start,
                        }),
                    });
                }
                _ => {}
            }
        }
        self.read_any_field()
    }

    /// The general case of [`FieldReader::read_field`]: any tag, any wire type.
    #[inline(never)]
    fn read_any_field(&mut self) -> Result<Field<'a>, WireProblem> {
        self.current = None;
        let key = read_varint(self.buf, &mut self.pos)?;
        let (number, wire) = split_key(key)?;
        self.current = Some(number);
        let value = match wire {
            0 => Value::Varint(read_varint(self.buf, &mut self.pos)?),
            1 => {
                skip_fixed(self.buf, &mut self.pos, 8)?;
                Value::Fixed64
            }
            2 => {
                let prefix_start = self.pos;
                let bytes = read_len(self.buf, &mut self.pos)?;
                let payload_start = self.pos - bytes.len();
                Value::Len(LenValue {
                    bytes,
                    prefix_start: self.base + prefix_start,
                    payload_start: self.base + payload_start,
                })
            }
            3 => {
                skip_group(self.buf, &mut self.pos, number)?;
                Value::Group
            }
            4 => return Err(WireProblem::UnmatchedEndGroup),
            5 => {
                skip_fixed(self.buf, &mut self.pos, 4)?;
                Value::Fixed32
            }
            other => return Err(WireProblem::BadWireType(other)),
        };
        Ok(Field { number, value })
    }
}

impl<'a> Iterator for FieldReader<'a> {
    type Item = Result<Field<'a>, WireProblem>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let field = self.read_field();
        self.failed = field.is_err();
        Some(field)
    }
}

/// Iterates over a packed run of varints (a packed `repeated uint32`, for instance).
#[derive(Clone, Debug)]
pub(crate) struct PackedVarints<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> PackedVarints<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        PackedVarints { buf, pos: 0 }
    }

    /// Checks the whole run, so that later iterations cannot fail.
    pub fn validate(buf: &[u8]) -> Result<(), WireProblem> {
        let mut pos = 0;
        while pos < buf.len() {
            read_varint(buf, &mut pos)?;
        }
        Ok(())
    }
}

impl Iterator for PackedVarints<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.pos >= self.buf.len() {
            return None;
        }
        match read_varint(self.buf, &mut self.pos) {
            Ok(value) => Some(value),
            Err(_) => {
                self.pos = self.buf.len();
                None
            }
        }
    }
}

#[inline]
fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireProblem> {
    // Tags and most lengths in a listener fit in one byte.
    if let Some(&byte) = buf.get(*pos)
        && byte < 0x80
    {
        *pos += 1;
        return Ok(u64::from(byte));
    }
    let mut value: u64 = 0;
    for shift in (0..70).step_by(7) {
        let byte = *buf.get(*pos).ok_or(WireProblem::Truncated)?;
        *pos += 1;
        // The tenth byte holds only the 64th bit; anything more would be silently lost.
        if shift == 63 && byte > 1 {
            return Err(WireProblem::VarintTooLong);
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireProblem::VarintTooLong)
}

#[inline]
fn split_key(key: u64) -> Result<(u32, u8), WireProblem> {
    let key = u32::try_from(key).map_err(|_| WireProblem::BadFieldNumber)?;
    let number = key >> 3;
    if number == 0 {
        return Err(WireProblem::BadFieldNumber);
    }
    // Masked to three bits, so the narrowing cannot lose anything.
    Ok((number, (key & 7) as u8))
}

#[inline]
fn read_len<'a>(buf: &'a [u8], pos: &mut usize) -> Result<&'a [u8], WireProblem> {
    let length = read_varint(buf, pos)?;
    let available = buf.len().saturating_sub(*pos);
    let len = usize::try_from(length)
        .ok()
        .filter(|len| *len <= available)
        .ok_or(WireProblem::LengthPastEnd { length, available })?;
    let bytes = buf.get(*pos..*pos + len).ok_or(WireProblem::Truncated)?;
    *pos += len;
    Ok(bytes)
}

fn skip_fixed(buf: &[u8], pos: &mut usize, width: usize) -> Result<(), WireProblem> {
    if buf.len().saturating_sub(*pos) < width {
        return Err(WireProblem::Truncated);
    }
    *pos += width;
    Ok(())
}

/// Skips the body of a group opened by field `number`, up to and including its end tag.
/// Iterative, with an explicit stack, so nesting cannot exhaust the call stack.
fn skip_group(buf: &[u8], pos: &mut usize, number: u32) -> Result<(), WireProblem> {
    let mut open = [0u32; MAX_GROUP_DEPTH];
    open[0] = number;
    let mut depth = 1;
    while depth > 0 {
        let (inner, wire) = split_key(read_varint(buf, pos)?)?;
        match wire {
            0 => {
                read_varint(buf, pos)?;
            }
            1 => skip_fixed(buf, pos, 8)?,
            2 => {
                read_len(buf, pos)?;
            }
            3 => {
                let slot = open.get_mut(depth).ok_or(WireProblem::GroupsTooDeep)?;
                *slot = inner;
                depth += 1;
            }
            4 => {
                if open[depth - 1] != inner {
                    return Err(WireProblem::UnmatchedEndGroup);
                }
                depth -= 1;
            }
            5 => skip_fixed(buf, pos, 4)?,
            other => return Err(WireProblem::BadWireType(other)),
        }
    }
    Ok(())
}

/// Number of bytes the varint encoding of `value` takes.
pub(crate) fn varint_len(value: u64) -> usize {
    // 64 - leading_zeros is at most 64, so the result is at most 10.
    ((64 - (value | 1).leading_zeros()) as usize).div_ceil(7)
}

/// Appends the varint encoding of `value`.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key_len(number: u32) -> usize {
    varint_len(u64::from(number) << 3)
}

/// Bytes of a length-delimited field `number` holding `value`: tag, length, payload.
pub(crate) fn string_field_len(number: u32, value: &str) -> usize {
    key_len(number) + varint_len(value.len() as u64) + value.len()
}

fn put_string_field(out: &mut Vec<u8>, number: u32, value: &str) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value.as_bytes());
}

/// What replaces the bytes of a [`Patch`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Replacement<'v> {
    /// A varint, typically a recomputed length prefix.
    Varint(u64),
    /// A length-delimited field, typically one more element of a `repeated string`.
    StringField { number: u32, value: &'v str },
}

impl Replacement<'_> {
    fn encoded_len(&self) -> usize {
        match self {
            Replacement::Varint(value) => varint_len(*value),
            Replacement::StringField { number, value } => string_field_len(*number, value),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Replacement::Varint(value) => put_varint(out, *value),
            Replacement::StringField { number, value } => put_string_field(out, *number, value),
        }
    }
}

/// One edit of the input: the bytes in `span` (possibly empty, for an insertion) are replaced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Patch<'v> {
    pub start: usize,
    pub end: usize,
    pub with: Replacement<'v>,
}

/// Why [`splice`] could not apply its patches. Only a bug in the caller can cause it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SpliceProblem {
    /// Patches overlap, are out of order or reach past the input.
    BadPatch,
    /// The output length does not fit in memory.
    TooLarge,
}

/// Applies `patches` (sorted by position, not overlapping) to `input` in one pass, writing into
/// a buffer allocated once at its final size.
pub(crate) fn splice(input: &[u8], patches: &[Patch<'_>]) -> Result<Vec<u8>, SpliceProblem> {
    let mut size = input.len();
    for patch in patches {
        let removed = patch
            .end
            .checked_sub(patch.start)
            .ok_or(SpliceProblem::BadPatch)?;
        size = size
            .checked_sub(removed)
            .and_then(|size| size.checked_add(patch.with.encoded_len()))
            .ok_or(SpliceProblem::TooLarge)?;
    }

    let mut out = Vec::with_capacity(size);
    let mut cursor = 0;
    for patch in patches {
        let kept = input
            .get(cursor..patch.start)
            .ok_or(SpliceProblem::BadPatch)?;
        out.extend_from_slice(kept);
        patch.with.write(&mut out);
        cursor = patch.end;
    }
    out.extend_from_slice(input.get(cursor..).ok_or(SpliceProblem::BadPatch)?);
    debug_assert_eq!(out.len(), size);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(buf: &[u8]) -> Vec<Result<(u32, WireType), WireProblem>> {
        FieldReader::new(buf, 0)
            .map(|field| field.map(|f| (f.number, f.wire_type())))
            .collect()
    }

    #[test]
    fn varints_round_trip_at_every_width() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), varint_len(value), "length of {value}");
            let mut reference = Vec::new();
            prost::encoding::encode_varint(value, &mut reference);
            assert_eq!(buf, reference, "{value}");
            let mut pos = 0;
            assert_eq!(read_varint(&buf, &mut pos), Ok(value));
            assert_eq!(pos, buf.len());
        }
    }

    #[test]
    fn overlong_varints_are_rejected() {
        let mut eleven = vec![0x80; 10];
        eleven.push(0);
        assert_eq!(
            read_varint(&eleven, &mut 0),
            Err(WireProblem::VarintTooLong)
        );
        // Ten bytes whose last one carries bits beyond the 64th.
        let mut high = vec![0xff; 9];
        high.push(0x02);
        assert_eq!(read_varint(&high, &mut 0), Err(WireProblem::VarintTooLong));
        assert_eq!(
            read_varint(&[0x80, 0x80], &mut 0),
            Err(WireProblem::Truncated)
        );
    }

    #[test]
    fn enums_keep_the_low_32_bits() {
        let enumeration = |bytes: &[u8]| {
            let mut field = vec![0x08];
            field.extend_from_slice(bytes);
            let read = FieldReader::new(&field, 0).next().unwrap().unwrap();
            read.enumeration()
        };
        assert_eq!(enumeration(&[0x01]), Ok(1));
        // 1 + 5 * 2^32: the bits above the 32nd are dropped, as prost and Envoy drop them.
        assert_eq!(enumeration(&[0x81, 0x80, 0x80, 0x80, 0x50]), Ok(1));
        // -1, sign-extended to ten bytes.
        let minus_one = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(enumeration(&minus_one), Ok(-1));
    }

    #[test]
    fn non_minimal_varints_are_accepted() {
        // 1 written in three bytes: parsers must accept it.
        assert_eq!(read_varint(&[0x81, 0x80, 0x00], &mut 0), Ok(1));
    }

    #[test]
    fn framing_problems_are_reported_once() {
        assert_eq!(
            fields(&[0x00, 0x01]),
            vec![Err(WireProblem::BadFieldNumber)]
        );
        assert_eq!(fields(&[0x0e]), vec![Err(WireProblem::BadWireType(6))]);
        assert_eq!(fields(&[0x0c]), vec![Err(WireProblem::UnmatchedEndGroup)]);
        assert_eq!(fields(&[0x09, 1, 2, 3]), vec![Err(WireProblem::Truncated)]);
        assert_eq!(
            fields(&[0x0a, 5, 1, 2]),
            vec![Err(WireProblem::LengthPastEnd {
                length: 5,
                available: 2
            })]
        );
        assert_eq!(
            fields(&[0x08, 1, 0x12, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            vec![
                Ok((1, WireType::Varint)),
                Err(WireProblem::LengthPastEnd {
                    length: u64::from(u32::MAX),
                    available: 0
                })
            ]
        );
    }

    #[test]
    fn groups_are_skipped_with_bounded_depth() {
        // Field 1 group holding field 2 varint and a nested field 3 group, then field 4 varint.
        let buf = [0x0b, 0x10, 0x05, 0x1b, 0x1c, 0x0c, 0x20, 0x07];
        assert_eq!(
            fields(&buf),
            vec![Ok((1, WireType::StartGroup)), Ok((4, WireType::Varint))]
        );

        // Mismatched end tag.
        assert_eq!(
            fields(&[0x0b, 0x14]),
            vec![Err(WireProblem::UnmatchedEndGroup)]
        );

        let mut deep = vec![0x0b; MAX_GROUP_DEPTH + 1];
        deep.extend(vec![0x0c; MAX_GROUP_DEPTH + 1]);
        assert_eq!(fields(&deep), vec![Err(WireProblem::GroupsTooDeep)]);

        let mut deepest_allowed = vec![0x0b; MAX_GROUP_DEPTH];
        deepest_allowed.extend(vec![0x0c; MAX_GROUP_DEPTH]);
        assert_eq!(
            fields(&deepest_allowed),
            vec![Ok((1, WireType::StartGroup))]
        );
    }

    #[test]
    fn len_values_carry_absolute_offsets() {
        // Field 2, length 3, "abc", read as if the message started at offset 100.
        let buf = [0x12, 0x03, b'a', b'b', b'c'];
        let field = FieldReader::new(&buf, 100).next().unwrap().unwrap();
        let value = field.len().unwrap();
        assert_eq!(value.prefix(), 101..102);
        assert_eq!(value.payload(), 102..105);
        assert_eq!(value.as_str(), Ok("abc"));
        assert_eq!(
            field.varint(),
            Err(WireProblem::WrongWireType {
                expected: WireType::Varint,
                found: WireType::Len
            })
        );
    }

    #[test]
    fn splice_replaces_and_inserts_in_one_pass() {
        let input = b"0123456789";
        let patches = [
            Patch {
                start: 1,
                end: 3,
                with: Replacement::Varint(300),
            },
            Patch {
                start: 5,
                end: 5,
                with: Replacement::StringField {
                    number: 10,
                    value: "h2",
                },
            },
            Patch {
                start: 5,
                end: 5,
                with: Replacement::Varint(1),
            },
        ];
        let out = splice(input, &patches).unwrap();
        assert_eq!(out, b"0\xac\x0234\x52\x02h2\x0156789".to_vec());

        let backwards = [patches[1], patches[0]];
        assert_eq!(splice(input, &backwards), Err(SpliceProblem::BadPatch));
    }
}

//! Sans-IO framing for [`Frame`]s: no sockets, no async, just bytes in and frames out.
//!
//! A record on the wire is a varint length prefix (LEB128, at most 10 bytes) followed by
//! exactly that many bytes of one protobuf-encoded [`Frame`]. The length counts the body
//! only, not the prefix, and `max_frame` bounds that body length in both directions.
//!
//! The decoder tells three outcomes apart, because a shell reacts to each differently:
//! - [`Decoded::NeedMore`]: the bytes so far are a valid beginning; read more and retry.
//! - [`Decoded::Frame`]: one frame, and how many bytes it used.
//! - [`DecodeError`]: the stream is broken and can never become valid; send an `Error`
//!   frame with [`DecodeError::code`] where the peer can take it, and close.
//!
//! A declared length over `max_frame` is rejected as soon as the prefix is complete, so a
//! peer cannot make us buffer (or allocate) more than `max_frame` plus a 10-byte prefix.

use bytes::{Buf, BytesMut};
use prost::Message;

use crate::{ErrorCode, Frame};

/// The default bound on one frame's protobuf body (see DESIGN.md, "Limits").
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// A u64 in LEB128 needs at most 10 bytes (9 × 7 bits + 1 bit).
const MAX_VARINT_LEN: usize = 10;

/// Encodes and decodes length-prefixed [`Frame`]s, refusing any over `max_frame` bytes.
///
/// It holds no buffer: callers own their bytes, so the same codec serves a `&[u8]`
/// ([`FrameCodec::decode`]) or a growing `BytesMut` ([`FrameCodec::decode_buf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

/// The outcome of a successful [`FrameCodec::decode`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// The buffer holds an incomplete (but so far valid) record.
    NeedMore,
    /// The buffer starts with a complete record; `consumed` bytes (prefix and body) were used.
    Frame { frame: Frame, consumed: usize },
}

/// Why a byte stream can never decode; the connection should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix runs past 10 bytes or does not fit in a u64.
    #[error("invalid frame length prefix (not a varint of at most 10 bytes)")]
    BadLengthPrefix,
    /// The declared body length exceeds the limit; nothing was buffered for it.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: u64, max: usize },
    /// The body is not a valid protobuf `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(prost::DecodeError),
    /// The body is valid protobuf but sets no `kind` (or only one this build does not know).
    #[error("frame has no kind")]
    EmptyFrame,
}

impl DecodeError {
    /// The code to put in the `Error` frame sent to the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::BadLengthPrefix | Self::Malformed(_) | Self::EmptyFrame => {
                ErrorCode::MalformedFrame
            }
        }
    }
}

/// Why a frame was not encoded; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The frame's body is larger than the peer would accept.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// The frame sets no `kind`; the peer would reject it as [`DecodeError::EmptyFrame`].
    #[error("frame has no kind")]
    EmptyFrame,
}

impl EncodeError {
    /// The code to report if the failure is surfaced to a peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::EmptyFrame => ErrorCode::MalformedFrame,
        }
    }
}

/// Where the body of the record at the start of a buffer lies.
enum Header {
    /// The prefix itself is not complete yet.
    Incomplete,
    /// The prefix is complete and within limits.
    Complete { prefix_len: usize, body_len: usize },
}

impl FrameCodec {
    /// A codec that refuses frame bodies longer than `max_frame` bytes.
    ///
    /// `max_frame` is also a memory bound: on a peer's word alone, [`Self::decode_buf`]
    /// reserves up to `max_frame` plus a 10-byte prefix per connection.
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    /// The largest frame body (excluding the length prefix) this codec accepts or writes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Decodes the record at the start of `buf`, if it is complete.
    ///
    /// Bytes after the first record are left alone; call again on `&buf[consumed..]`.
    /// The result depends only on the bytes up to the end of the first record (or of the
    /// prefix, for a prefix error), so appending more bytes never changes a decided answer.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, DecodeError> {
        let (prefix_len, body_len) = match self.header(buf)? {
            Header::Incomplete => return Ok(Decoded::NeedMore),
            Header::Complete {
                prefix_len,
                body_len,
            } => (prefix_len, body_len),
        };
        // `header` guarantees prefix_len <= buf.len(); compare lengths rather than adding
        // them, so even a `max_frame` near usize::MAX cannot overflow.
        let available = buf.len() - prefix_len;
        if available < body_len {
            return Ok(Decoded::NeedMore);
        }
        let body = &buf[prefix_len..prefix_len + body_len];
        let frame = Frame::decode(body).map_err(DecodeError::Malformed)?;
        if frame.kind.is_none() {
            return Err(DecodeError::EmptyFrame);
        }
        Ok(Decoded::Frame {
            frame,
            consumed: prefix_len + body_len,
        })
    }

    /// Decodes one frame body with no length prefix: a transport that frames messages
    /// itself (one WebSocket binary message = one frame) checks it as [`Self::decode`]
    /// checks a prefixed record, so both gateways refuse the same bodies the same way.
    pub fn decode_body(&self, body: &[u8]) -> Result<Frame, DecodeError> {
        if body.len() > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len: body.len() as u64,
                max: self.max_frame,
            });
        }
        let frame = Frame::decode(body).map_err(DecodeError::Malformed)?;
        if frame.kind.is_none() {
            return Err(DecodeError::EmptyFrame);
        }
        Ok(frame)
    }

    /// Decodes the record at the start of `buf` and advances `buf` past it.
    ///
    /// `Ok(None)` means more bytes are needed; once the prefix is known (and within
    /// limits) `buf` has capacity reserved for the whole record, so the caller's next read
    /// can fill it. On error `buf` is left as it was.
    pub fn decode_buf(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        match self.decode(buf)? {
            Decoded::Frame { frame, consumed } => {
                buf.advance(consumed);
                Ok(Some(frame))
            }
            Decoded::NeedMore => {
                if let Header::Complete {
                    prefix_len,
                    body_len,
                } = self.header(buf)?
                    // Checked: with `max_frame` near usize::MAX a peer's length can make
                    // the record size overflow; then there is nothing sensible to reserve.
                    && let Some(record_len) = prefix_len.checked_add(body_len)
                {
                    // body_len was checked against max_frame, so this is a bounded
                    // reservation, not one the peer chose.
                    buf.reserve(record_len.saturating_sub(buf.len()));
                }
                Ok(None)
            }
        }
    }

    /// Appends `frame`, length-prefixed, to `dst`.
    ///
    /// On error nothing is written.
    pub fn encode(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        if frame.kind.is_none() {
            return Err(EncodeError::EmptyFrame);
        }
        let len = frame.encoded_len();
        if len > self.max_frame {
            return Err(EncodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst.reserve(prost::length_delimiter_len(len) + len);
        // Infallible: `reserve` made room, and BytesMut grows anyway.
        frame
            .encode_length_delimited(dst)
            .expect("BytesMut has room for the whole record after reserve");
        Ok(())
    }

    /// Parses and checks the length prefix at the start of `buf`.
    ///
    /// Our own varint reader, because prost's `decode_length_delimiter` reports a prefix
    /// cut short by the end of the buffer as an error, where we need "read more".
    fn header(&self, buf: &[u8]) -> Result<Header, DecodeError> {
        let mut value: u64 = 0;
        for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
            let bits = u64::from(byte & 0x7f);
            // The 10th byte carries bit 63 only; anything more overflows a u64.
            if i == MAX_VARINT_LEN - 1 && bits > 1 {
                return Err(DecodeError::BadLengthPrefix);
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return self.check_len(value, i + 1);
            }
        }
        if buf.len() >= MAX_VARINT_LEN {
            // Ten continuation bytes: an 11th byte would be needed, which no u64 has.
            Err(DecodeError::BadLengthPrefix)
        } else {
            Ok(Header::Incomplete)
        }
    }

    fn check_len(&self, len: u64, prefix_len: usize) -> Result<Header, DecodeError> {
        match usize::try_from(len) {
            Ok(body_len) if body_len <= self.max_frame => Ok(Header::Complete {
                prefix_len,
                body_len,
            }),
            _ => Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            }),
        }
    }
}

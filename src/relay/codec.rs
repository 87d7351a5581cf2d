//! A gRPC codec that keeps every message's received bytes beside its decoded envelope.
//!
//! The relay decodes the ADS envelopes of `proto/` to read type URLs, nonces and versions, but a
//! message it does not change goes out as the exact bytes that came in: fields that this build
//! does not know survive, and nothing is re-encoded on the hot path.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// One ADS message: its decoded envelope and, while unchanged, the bytes it arrived as.
#[derive(Debug, Clone)]
pub struct Frame<T> {
    msg: T,
    raw: Option<Bytes>,
}

impl<T: Message + Default> Frame<T> {
    /// A message made by the relay; it is encoded when sent.
    pub fn new(msg: T) -> Self {
        Self { msg, raw: None }
    }

    /// Decodes `raw` and keeps it, so that the frame is sent back out byte for byte.
    pub fn decode(raw: Bytes) -> Result<Self, prost::DecodeError> {
        let msg = T::decode(raw.clone())?;
        Ok(Self {
            msg,
            raw: Some(raw),
        })
    }

    /// The decoded envelope.
    pub fn msg(&self) -> &T {
        &self.msg
    }

    /// The envelope for editing; the frame is then encoded afresh when sent.
    pub fn msg_mut(&mut self) -> &mut T {
        self.raw = None;
        &mut self.msg
    }

    /// Whether the frame still holds the bytes it was received as.
    pub fn is_original(&self) -> bool {
        self.raw.is_some()
    }

    /// The bytes this frame is sent as.
    pub fn to_bytes(&self) -> Bytes {
        match &self.raw {
            Some(raw) => raw.clone(),
            None => self.msg.encode_to_vec().into(),
        }
    }

    /// How many bytes the frame takes on the wire.
    pub fn wire_len(&self) -> usize {
        match &self.raw {
            Some(raw) => raw.len(),
            None => self.msg.encoded_len(),
        }
    }

    /// Whether the received bytes hold fields that the envelope does not declare; those are
    /// lost if the frame is edited.
    pub fn has_unknown_fields(&self) -> bool {
        self.raw
            .as_ref()
            .is_some_and(|raw| raw.len() != self.msg.encoded_len())
    }
}

/// A tonic codec for [`Frame`]s: `E` is sent, `D` is received.
#[derive(Debug)]
pub struct FrameCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for FrameCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<E, D> Codec for FrameCodec<E, D>
where
    E: Message + Default + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = Frame<E>;
    type Decode = Frame<D>;
    type Encoder = FrameEncoder<E>;
    type Decoder = FrameDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        FrameEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        FrameDecoder(PhantomData)
    }
}

/// Writes a [`Frame`]: its original bytes when it has them, its envelope otherwise.
#[derive(Debug)]
pub struct FrameEncoder<E>(PhantomData<fn() -> E>);

impl<E: Message + Default> Encoder for FrameEncoder<E> {
    type Item = Frame<E>;
    type Error = Status;

    fn encode(&mut self, item: Frame<E>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item.raw {
            Some(raw) => {
                dst.reserve(raw.len());
                dst.put_slice(&raw);
                Ok(())
            }
            None => item
                .msg
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding an ADS message failed: {e}"))),
        }
    }
}

/// Reads a [`Frame`] without copying: the bytes are a view of tonic's receive buffer.
#[derive(Debug)]
pub struct FrameDecoder<D>(PhantomData<fn() -> D>);

impl<D: Message + Default> Decoder for FrameDecoder<D> {
    type Item = Frame<D>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Frame<D>>, Status> {
        let raw = src.copy_to_bytes(src.remaining());
        Frame::decode(raw)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed ADS message: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DiscoveryRequest;

    #[test]
    fn unchanged_frame_keeps_unknown_fields() {
        let known = DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
            ..Default::default()
        };
        let mut bytes = known.encode_to_vec();
        // Field 99, varint 7: unknown to the envelope.
        bytes.extend_from_slice(&[0x98, 0x06, 0x07]);

        let frame = Frame::<DiscoveryRequest>::decode(Bytes::from(bytes.clone())).unwrap();
        assert!(frame.has_unknown_fields());
        assert_eq!(frame.to_bytes(), Bytes::from(bytes));

        let mut edited = frame.clone();
        edited.msg_mut().response_nonce = "n".into();
        assert!(!edited.is_original());
        assert_eq!(
            DiscoveryRequest::decode(edited.to_bytes())
                .unwrap()
                .response_nonce,
            "n"
        );
    }
}

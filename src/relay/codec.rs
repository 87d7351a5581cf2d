//! gRPC framing that keeps every message's received bytes beside its decoded envelope.
//!
//! The relay decodes the ADS envelopes of `proto/` to read type URLs, nonces and versions, but a
//! message it does not change goes out as the exact bytes that came in: fields that this build
//! does not know survive, and nothing is re-encoded on the hot path.
//!
//! The framing works on the HTTP/2 bodies directly rather than through tonic's codec, whose
//! buffers grow to the largest message a stream has carried and keep that size for the life of
//! the stream: with LDS responses of a few hundred kB to a few MB, that is what a relay of
//! thousands of streams would spend its memory on. Here a received message is gathered from the
//! body's chunks into a buffer of its own size, freed when the message is, and a message sent
//! goes to HTTP/2 as the bytes it already is, without a copy.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::HeaderMap;
use http_body_util::BodyExt;
use prost::Message;
use tonic::Status;
use tonic::body::Body;

use crate::wire::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
/// One ADS message: its decoded envelope and, while unchanged, the bytes it arrived as.
#[derive(Debug, Clone)]
pub struct Frame<T> {
    // Boxed: frames wait in per-stream queues whose slots are allocated in blocks.
    msg: Box<T>,
    raw: Option<Bytes>,
}

impl<T: Message + Default> Frame<T> {
    /// A message made by the relay; it is encoded when sent.
    pub fn new(msg: T) -> Self {
        Self {
            msg: Box::new(msg),
            raw: None,
        }
    }

    /// Decodes `raw` and keeps it, so that the frame is sent back out byte for byte.
    pub fn decode(raw: Bytes) -> Result<Self, prost::DecodeError> {
        let msg = T::decode(raw.clone())?;
        Ok(Self {
            msg: Box::new(msg),
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

impl<T: Message + Default + Payloads> Frame<T> {
    /// The bytes of [`Frame::to_bytes`] in pieces that together are the same bytes: the received
    /// bytes as they are, or for an edited message its envelope with every large payload as a
    /// piece of its own, so that resources shared with the listener cache are never copied.
    pub fn into_pieces(self) -> Vec<Bytes> {
        if let Some(raw) = self.raw {
            return vec![raw];
        }
        let mut msg = self.msg;
        let payloads = msg.take_payloads();
        let head = msg.encode_to_vec();
        if payloads.is_empty() {
            return vec![Bytes::from(head)];
        }

        // prost writes fields in number order: field 1, if set, comes before the payloads.
        let split = leading_field_len(&head, FIELD_1_LEN_KEY);
        let mut pieces = Vec::new();
        let mut pending = BytesMut::with_capacity(head.len() + 16 * payloads.len());
        pending.put_slice(&head[..split]);
        for payload in payloads {
            pending.put_u8(PAYLOADS_KEY);
            prost::encoding::encode_varint(payload.len() as u64, &mut pending);
            if payload.len() <= COALESCE {
                pending.put_slice(&payload);
            } else {
                pieces.push(pending.split().freeze());
                pieces.push(payload);
            }
        }
        pending.put_slice(&head[split..]);
        pieces.push(pending.freeze());
        pieces.retain(|piece| !piece.is_empty());
        pieces
    }
}

/// Key of a length-delimited field 1.
const FIELD_1_LEN_KEY: u8 = 0x0a;
/// Key of the payloads: field 2, length-delimited, in both response messages.
const PAYLOADS_KEY: u8 = 0x12;

/// Bytes of the field at the start of `encoded` when its key is `key`, else 0.
fn leading_field_len(encoded: &[u8], key: u8) -> usize {
    if encoded.first() != Some(&key) {
        return 0;
    }
    let mut rest = &encoded[1..];
    let before = rest.len();
    match prost::encoding::decode_varint(&mut rest) {
        Ok(len) => (1 + before - rest.len())
            .saturating_add(usize::try_from(len).unwrap_or(usize::MAX))
            .min(encoded.len()),
        Err(_) => 0,
    }
}

/// ADS messages whose `repeated bytes` field 2 carries payloads: the resources of both response
/// messages. Requests have none.
pub trait Payloads {
    /// Takes the payloads out of the message.
    fn take_payloads(&mut self) -> Vec<Bytes>;
}

impl Payloads for DiscoveryResponse {
    fn take_payloads(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.resources)
    }
}

impl Payloads for DeltaDiscoveryResponse {
    fn take_payloads(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.resources)
    }
}

impl Payloads for DiscoveryRequest {
    fn take_payloads(&mut self) -> Vec<Bytes> {
        Vec::new()
    }
}

impl Payloads for DeltaDiscoveryRequest {
    fn take_payloads(&mut self) -> Vec<Bytes> {
        Vec::new()
    }
}

/// A copy of `msg` that shares no bytes with the buffer it was received in. A decoded envelope
/// kept beyond its message (istiod's `control_plane`, say) would otherwise keep the whole
/// received message alive.
pub fn owned<T: Message + Default>(msg: &T) -> T {
    T::decode(msg.encode_to_vec().as_slice()).unwrap_or_default()
}

/// The five bytes before every gRPC message: a compression flag and a big-endian length.
const HEADER_LEN: usize = 5;

/// Messages up to this size go to HTTP/2 in one piece with their header; larger ones as two
/// pieces, so that they are not copied.
const COALESCE: usize = 4096;

/// The gRPC messages of one direction of a stream, as [`Frame`]s: the sidecar's requests, or
/// istiod's responses.
#[derive(Debug)]
pub struct MessageStream<T> {
    body: Body,
    /// Received bytes not yet taken as messages, as the body delivered them.
    chunks: VecDeque<Bytes>,
    buffered: usize,
    max_message_size: usize,
    ended: bool,
    _message: PhantomData<fn() -> T>,
}

impl<T: Message + Default> MessageStream<T> {
    /// Reads the messages of `body`, refusing any larger than `max_message_size`.
    pub fn new(body: Body, max_message_size: usize) -> Self {
        Self {
            body,
            chunks: VecDeque::new(),
            buffered: 0,
            max_message_size,
            ended: false,
            _message: PhantomData,
        }
    }

    /// The next message; `None` when the body ended cleanly. A `grpc-status` other than OK in
    /// the trailers, a reset stream or a malformed message is an error.
    pub async fn message(&mut self) -> Result<Option<Frame<T>>, Status> {
        loop {
            if let Some(raw) = self.next_raw()? {
                return Frame::decode(raw)
                    .map(Some)
                    .map_err(|e| Status::invalid_argument(format!("malformed ADS message: {e}")));
            }
            if self.ended {
                if self.buffered > 0 {
                    return Err(Status::internal("the stream ended inside a gRPC message"));
                }
                return Ok(None);
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(status)) => return Err(status),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            self.buffered += data.len();
                            self.chunks.push_back(data);
                        }
                    }
                    Err(frame) => {
                        self.ended = true;
                        if let Some(status) = frame.trailers_ref().and_then(error_status) {
                            return Err(status);
                        }
                    }
                },
            }
        }
    }

    /// The bytes of the next message, once all of them have arrived.
    fn next_raw(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buffered < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        let mut filled = 0;
        for chunk in &self.chunks {
            let take = (HEADER_LEN - filled).min(chunk.len());
            header[filled..filled + take].copy_from_slice(&chunk[..take]);
            filled += take;
            if filled == HEADER_LEN {
                break;
            }
        }
        if header[0] != 0 {
            return Err(Status::unimplemented(
                "compressed gRPC messages are not accepted",
            ));
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > self.max_message_size {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes is over the limit of {} bytes",
                self.max_message_size
            )));
        }
        if self.buffered - HEADER_LEN < len {
            return Ok(None);
        }
        self.take(HEADER_LEN);
        Ok(Some(self.take(len)))
    }

    /// Takes `len` buffered bytes: a view of the first chunk when they all lie in it, else a
    /// copy into a buffer of exactly `len` bytes, so that no larger buffer outlives them.
    fn take(&mut self, len: usize) -> Bytes {
        self.buffered -= len;
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= len
        {
            let taken = front.split_to(len);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return taken;
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let take = (len - out.len()).min(front.len());
            out.put_slice(&front[..take]);
            front.advance(take);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        out.freeze()
    }
}

/// The status in trailers (or trailers-only response headers), when it is not OK.
pub fn error_status(headers: &HeaderMap) -> Option<Status> {
    Status::from_header_map(headers).filter(|status| status.code() != tonic::Code::Ok)
}

/// Frames as an HTTP/2 body of gRPC messages.
///
/// A response body (`trailers`) ends with `grpc-status` trailers: OK when the frames end, the
/// status when an error comes. A request body ends when the frames do, and an error resets
/// the stream.
struct FrameBody<T> {
    frames: Pin<Box<dyn Stream<Item = Result<Frame<T>, Status>> + Send>>,
    /// The rest of a message whose header went out.
    pieces: VecDeque<Bytes>,
    trailers: bool,
    done: bool,
    max_message_size: usize,
}

impl<T: Message + Default + Payloads> FrameBody<T> {
    fn end(&mut self, status: Status) -> Option<Result<http_body::Frame<Bytes>, Status>> {
        self.done = true;
        if !self.trailers {
            return (status.code() != tonic::Code::Ok).then_some(Err(status));
        }
        let mut trailers = HeaderMap::new();
        if let Err(unencodable) = status.add_header(&mut trailers) {
            let _ = Status::internal(unencodable.message().to_string()).add_header(&mut trailers);
        }
        Some(Ok(http_body::Frame::trailers(trailers)))
    }
}

impl<T: Message + Default + Payloads> http_body::Body for FrameBody<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(piece) = self.pieces.pop_front() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let frame = match ready!(self.frames.as_mut().poll_next(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(status)) => return Poll::Ready(self.end(status)),
            None => return Poll::Ready(self.end(Status::ok(""))),
        };

        let mut pieces: VecDeque<Bytes> = frame.into_pieces().into();
        let total: usize = pieces.iter().map(Bytes::len).sum();
        let len = match u32::try_from(total) {
            Ok(len) if total <= self.max_message_size => len,
            _ => {
                let status = Status::out_of_range(format!(
                    "a message of {total} bytes is over the limit of {} bytes",
                    self.max_message_size
                ));
                return Poll::Ready(self.end(status));
            }
        };
        // The header goes out with the first piece when that is small, on its own otherwise.
        let first = pieces
            .front()
            .filter(|p| p.len() <= COALESCE)
            .map(Bytes::len);
        let mut header = BytesMut::with_capacity(HEADER_LEN + first.unwrap_or(0));
        header.put_u8(0);
        header.put_u32(len);
        if first.is_some()
            && let Some(piece) = pieces.pop_front()
        {
            header.put_slice(&piece);
        }
        self.pieces = pieces;
        Poll::Ready(Some(Ok(http_body::Frame::data(header.freeze()))))
    }
}

/// The body of a response to a sidecar: every frame `responses` yields, then the status.
pub fn response_body<T>(
    responses: impl Stream<Item = Result<Frame<T>, Status>> + Send + 'static,
    max_message_size: usize,
) -> Body
where
    T: Message + Default + Payloads + Send + 'static,
{
    Body::new(FrameBody {
        frames: Box::pin(responses),
        pieces: VecDeque::new(),
        trailers: true,
        done: false,
        max_message_size,
    })
}

/// The body of a request to istiod: every frame `requests` yields.
pub fn request_body<T>(
    requests: impl Stream<Item = Frame<T>> + Send + 'static,
    max_message_size: usize,
) -> Body
where
    T: Message + Default + Payloads + Send + 'static,
{
    Body::new(FrameBody {
        frames: Box::pin(requests.map(Ok)),
        pieces: VecDeque::new(),
        trailers: false,
        done: false,
        max_message_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio_stream::wrappers::ReceiverStream;

    const LIMIT: usize = 1 << 20;

    fn response(version: &str, sizes: &[usize]) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            resources: sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
                .collect(),
            type_url: "type.googleapis.com/x.Y".into(),
            nonce: "n1".into(),
            control_plane: Bytes::from_static(b"\x0a\x06istiod"),
            ..Default::default()
        }
    }

    /// A body that delivers `bytes` in chunks of `chunk` bytes, then `trailers` if given.
    fn chunked(bytes: Vec<u8>, chunk: usize, trailers: Option<HeaderMap>) -> Body {
        let mut frames: Vec<Result<http_body::Frame<Bytes>, Status>> = bytes
            .chunks(chunk)
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        frames.extend(trailers.map(|t| Ok(http_body::Frame::trailers(t))));
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    fn grpc_message(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn pieces_are_the_encoded_bytes() {
        for (version, sizes) in [
            ("v1", &[][..]),
            ("v1", &[10, 5000, 3, 70_000][..]),
            ("", &[9000, 9000][..]),
            ("", &[1, 2][..]),
        ] {
            let frame = Frame::new(response(version, sizes));
            let expected = frame.to_bytes();
            let pieces = frame.into_pieces();
            assert_eq!(pieces.concat(), expected.to_vec(), "{version:?} {sizes:?}");
            // Large payloads travel as pieces of their own.
            let large = sizes.iter().filter(|&&n| n > COALESCE).count();
            assert!(pieces.iter().filter(|p| p.len() > COALESCE).count() >= large);
        }

        let raw = Bytes::from(response("v1", &[100]).encode_to_vec());
        let unchanged = Frame::<DiscoveryResponse>::decode(raw.clone()).unwrap();
        assert_eq!(unchanged.into_pieces(), vec![raw]);
    }

    #[test]
    fn owned_copies_share_nothing_with_the_message() {
        let raw = Bytes::from(response("v1", &[100]).encode_to_vec());
        let frame = Frame::<DiscoveryResponse>::decode(raw.clone()).unwrap();
        let kept = owned(frame.msg());
        assert_eq!(&kept, frame.msg());
        let inside = |b: &Bytes| raw.as_ptr_range().contains(&b.as_ptr());
        assert!(inside(&frame.msg().control_plane));
        assert!(!inside(&kept.control_plane));
    }

    #[tokio::test]
    async fn bodies_carry_frames_both_ways() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let edited = Frame::new(response("v2", &[20_000, 7, 40_000]));
        let raw = Bytes::from(response("v1", &[5]).encode_to_vec());
        let unchanged = Frame::<DiscoveryResponse>::decode(raw.clone()).unwrap();
        let expected = [edited.to_bytes(), raw];
        tx.send(Ok(edited)).await.unwrap();
        tx.send(Ok(unchanged)).await.unwrap();
        drop(tx);

        let mut body = response_body(ReceiverStream::new(rx), LIMIT);
        let mut wire = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame.unwrap().into_data() {
                Ok(data) => wire.extend_from_slice(&data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");

        // Read back in chunks of every size, across message boundaries.
        for chunk in [1, 4, 5, 1000, 16_384, wire.len()] {
            let body = chunked(wire.clone(), chunk, Some(trailers.clone()));
            let mut messages = MessageStream::<DiscoveryResponse>::new(body, LIMIT);
            for bytes in &expected {
                let frame = messages.message().await.unwrap().unwrap();
                assert!(frame.is_original());
                assert_eq!(&frame.to_bytes(), bytes, "chunks of {chunk}");
            }
            assert!(messages.message().await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn an_error_ends_a_response_body_with_its_status() {
        let stream = futures::stream::iter([Err::<Frame<DiscoveryResponse>, _>(
            Status::unavailable("istiod went away"),
        )]);
        let mut body = response_body(stream, LIMIT);
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        let status = error_status(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "istiod went away");

        let body = chunked(Vec::new(), 1, Some(trailers));
        let mut messages = MessageStream::<DiscoveryResponse>::new(body, LIMIT);
        let error = messages.message().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn bad_messages_are_refused() {
        let big = grpc_message(&[0; 100]);
        let mut messages = MessageStream::<DiscoveryRequest>::new(chunked(big, 7, None), 99);
        let error = messages.message().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::OutOfRange);

        let mut compressed = grpc_message(b"x");
        compressed[0] = 1;
        let mut messages = MessageStream::<DiscoveryRequest>::new(chunked(compressed, 7, None), 99);
        let error = messages.message().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unimplemented);

        let cut = grpc_message(&[0; 10])[..8].to_vec();
        let mut messages = MessageStream::<DiscoveryRequest>::new(chunked(cut, 3, None), 99);
        let error = messages.message().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Internal);

        let garbage = grpc_message(&[0xff; 4]);
        let mut messages = MessageStream::<DiscoveryRequest>::new(chunked(garbage, 3, None), 99);
        let error = messages.message().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_not_sent() {
        let stream = futures::stream::iter([Ok(Frame::new(response("v", &[200])))]);
        let mut body = response_body(stream, 100);
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(
            error_status(&trailers).unwrap().code(),
            tonic::Code::OutOfRange
        );
        assert!(body.frame().await.is_none());
    }

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

//! gRPC message framing over raw HTTP/2 bodies, for the simulated sidecars and the bench
//! upstream.
//!
//! tonic's codecs keep, per stream, a buffer as large as the largest message the stream carried.
//! With ten thousand streams of 300 kB responses in the driver, that would make the driver's
//! memory, not the relay's, the limit of the benchmark. Here a received message is assembled
//! from the body's chunks and freed once read, and a sent message goes out as its pieces, with
//! no copy.

use std::collections::VecDeque;
use std::convert::Infallible;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{StreamExt, stream};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The five bytes before every gRPC message: a compression flag and a big-endian length.
const HEADER: usize = 5;

/// Largest message accepted.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Cuts a byte stream into gRPC messages.
#[derive(Default)]
pub struct Deframer {
    chunks: VecDeque<Bytes>,
    buffered: usize,
}

impl Deframer {
    /// Adds bytes received.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffered += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// The next complete message, if all its bytes are here.
    pub fn next_message(&mut self) -> anyhow::Result<Option<Bytes>> {
        if self.buffered < HEADER {
            return Ok(None);
        }
        let mut header = [0u8; HEADER];
        let mut filled = 0;
        for chunk in &self.chunks {
            let take = (HEADER - filled).min(chunk.len());
            header[filled..filled + take].copy_from_slice(&chunk[..take]);
            filled += take;
            if filled == HEADER {
                break;
            }
        }
        if header[0] != 0 {
            bail!("compressed gRPC messages are not expected");
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_MESSAGE {
            bail!("a gRPC message of {len} bytes is over the limit");
        }
        if self.buffered < HEADER + len {
            return Ok(None);
        }
        self.take(HEADER);
        Ok(Some(self.take(len)))
    }

    /// Takes `len` bytes from the front: a view of one chunk when they lie in one, a copy into
    /// a buffer of exactly `len` bytes otherwise.
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

/// The messages of a received HTTP/2 body, ending at its end or its trailers.
pub struct Messages<B> {
    body: B,
    deframer: Deframer,
    done: bool,
}

impl<B> Messages<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Reads messages from `body`.
    pub fn new(body: B) -> Self {
        Self {
            body,
            deframer: Deframer::default(),
            done: false,
        }
    }

    /// The next message; `None` at the end of the body. Trailers with a gRPC status other than
    /// OK end it with an error.
    pub async fn next(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            if let Some(message) = self.deframer.next_message()? {
                return Ok(Some(message));
            }
            if self.done {
                return Ok(None);
            }
            let Some(frame) = self.body.frame().await else {
                self.done = true;
                continue;
            };
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => bail!("the body failed: {e}"),
            };
            match frame.into_data() {
                Ok(data) => self.deframer.push(data),
                Err(frame) => {
                    self.done = true;
                    if let Some(trailers) = frame.trailers_ref() {
                        check_status(trailers)?;
                    }
                }
            }
        }
    }
}

/// Fails on a `grpc-status` other than 0.
pub fn check_status(headers: &http::HeaderMap) -> anyhow::Result<()> {
    match headers.get("grpc-status").map(|v| v.as_bytes()) {
        None | Some(b"0") => Ok(()),
        Some(code) => {
            let message = headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("");
            bail!(
                "gRPC status {}: {message}",
                String::from_utf8_lossy(code).into_owned()
            )
        }
    }
}

/// A body that sends each message received on `messages` (given as its pieces) with its gRPC
/// header; with `trailers`, it ends with `grpc-status: 0` as a server's response does.
pub fn message_body(messages: mpsc::Receiver<Vec<Bytes>>, trailers: bool) -> tonic::body::Body {
    let frames = ReceiverStream::new(messages)
        .flat_map(|pieces| stream::iter(framed(pieces)))
        .chain(stream::iter(trailers.then(ok_trailers)));
    tonic::body::Body::new(StreamBody::new(frames))
}

fn framed(pieces: Vec<Bytes>) -> Vec<Result<Frame<Bytes>, Infallible>> {
    let len: usize = pieces.iter().map(Bytes::len).sum();
    let mut header = BytesMut::with_capacity(HEADER);
    header.put_u8(0);
    header.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    std::iter::once(header.freeze())
        .chain(pieces)
        .map(|data| Ok(Frame::data(data)))
        .collect()
}

fn ok_trailers() -> Result<Frame<Bytes>, Infallible> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    Ok(Frame::trailers(trailers))
}

/// A gRPC request to `path` whose body is `body`.
pub fn request(
    path: &str,
    body: tonic::body::Body,
) -> anyhow::Result<http::Request<tonic::body::Body>> {
    http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .context("building a gRPC request")
}

/// A gRPC response whose body is `body`.
pub fn response(body: tonic::body::Body) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

//! The gRPC codec of every Strata service and client: prost's, except that each message
//! is encoded into a buffer reserved at its exact encoded size.
//!
//! tonic-prost's encoder writes a message into the stream's buffer as it goes, and the
//! buffer grows by doubling: a `$all` page (about 700 KB for 2,048 events) or a Raft
//! AppendEntries (often megabytes) was copied again at every doubling (`BytesMut::reserve_inner`
//! under the encode in a read-back profile, about 2 % of the leader). One `encoded_len` pass,
//! then one copy. A/B throughput moved within the noise.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder};

/// A [`Codec`] for `T` out and `U` in (the generated code names it through
/// `tonic_prost_build`'s `codec_path`).
#[derive(Debug, Clone)]
pub struct SizedProstCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SizedProstCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for SizedProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedProstEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
    }
}

/// Encodes `T` after reserving its encoded length (see the module doc).
#[derive(Debug, Clone)]
pub struct SizedProstEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for SizedProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf).map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }
}

//! The gRPC codec every generated client and server uses: prost encoding
//! with smaller per-stream buffers than tonic's default.
//!
//! tonic allocates an encode and a decode buffer of `buffer_size` for every
//! call, up front, and both live as long as the call. The agent stream is
//! one call per connected agent that lasts for days, so at 10,000 agents
//! tonic's 8 KiB default costs the coordinator 160 MiB in buffers that carry
//! messages of a few hundred bytes (BENCHMARKS.md, fan-out). A buffer grows
//! to fit a larger message (an artifact chunk) when one comes, so the
//! smaller start costs those calls one reallocation, not correctness.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode/decode buffer of one call: room for any control message.
pub const BUFFER_BYTES: usize = 1024;

/// How many bytes of ready messages a stream gathers into one write
/// (tonic's default).
pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// [`ProstCodec`] with the buffer sizes above; named in `build.rs` as the
/// generated code's codec.
#[derive(Debug, Clone, Copy)]
pub struct RolloutCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for RolloutCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for RolloutCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Decoder as _, Encoder as _};

    use super::*;
    use crate::pb;

    #[test]
    fn encoder_and_decoder_use_the_small_buffers() {
        let mut codec = RolloutCodec::<pb::Ping, pb::Ping>::default();
        let enc = codec.encoder().buffer_settings();
        let dec = codec.decoder().buffer_settings();
        for s in [enc, dec] {
            assert_eq!(format!("{s:?}"), format!("{:?}", settings()));
        }
        assert_ne!(
            format!("{:?}", settings()),
            format!("{:?}", BufferSettings::default()),
            "the point of this codec is a smaller buffer than tonic's default"
        );
    }
}

//! The inputs of vubd's fuzz targets (structured, decoded by `arbitrary`), their seeds, and
//! the encoder that turns a seed value into the bytes libFuzzer feeds a target.
//!
//! Each module is one target's input; the harnesses are in `fuzz_targets/`. `seeds` lists
//! every target's seeds; `examples/seeds.rs` writes them to `seeds/TARGET/`.

use std::fmt::Debug;

use arbitrary::{Arbitrary, Unstructured};

pub mod encode;
pub mod nvme_pcie;
pub mod nvme_tcp;
pub mod vhost_user;
pub mod virtio_blk;

use encode::Encode;

/// The bytes that make `arbitrary` decode `value` as a target's whole input, checked to
/// decode back to it.
pub fn to_bytes<T>(value: &T) -> Vec<u8>
where
    T: Encode + for<'a> Arbitrary<'a> + PartialEq + Debug,
{
    let mut bytes = Vec::new();
    value.encode(&mut bytes);
    let back = T::arbitrary_take_rest(Unstructured::new(&bytes)).expect("a seed decodes");
    assert_eq!(&back, value, "a seed decodes to what it was made from");
    bytes
}

/// Every target's seeds: (target, name, input bytes).
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, input) in nvme_pcie::seeds() {
        out.push(("nvme_pcie_cq", name, to_bytes(&input)));
    }
    for (name, input) in nvme_tcp::seeds() {
        out.push(("nvme_tcp_rx", name, to_bytes(&input)));
    }
    for (name, input) in vhost_user::seeds() {
        out.push(("vhost_user", name, to_bytes(&input)));
    }
    for (name, input) in virtio_blk::seeds() {
        out.push(("virtio_blk_request", name, to_bytes(&input)));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_seed_decodes_to_its_value_and_names_are_unique() {
        let seeds = super::seeds();
        let mut names: Vec<_> = seeds.iter().map(|s| (s.0, s.1)).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), seeds.len());
    }
}

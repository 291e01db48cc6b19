//! The inverse of `arbitrary`'s decoding, for the types the fuzz inputs use, so that seeds can
//! be written as values and saved as the bytes libFuzzer feeds the targets.
//!
//! `arbitrary` 1.x reads integers little-endian, a `bool` as the low bit of a byte, an
//! `Option` as a `bool` then the value, an array element by element, a `Vec` as a `true`
//! byte before each element and a `false` byte after the last, a derived struct field by
//! field, and a derived enum as a `u32` `d` choosing variant `(d * variants) >> 32` followed
//! by the variant's fields. The seed program checks every seed decodes back to its value
//! (`crate::check_round_trip`), so a drift between this module and `arbitrary` is caught.

/// Writes a value the way `arbitrary` reads it back.
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>);
}

macro_rules! encode_int {
    ($($t:ty),*) => {
        $(impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        })*
    };
}

encode_int!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode, const N: usize> Encode for [T; N] {
    fn encode(&self, out: &mut Vec<u8>) {
        self.iter().for_each(|x| x.encode(out));
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for x in self {
            true.encode(out);
            x.encode(out);
        }
        false.encode(out);
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Some(x) => {
                true.encode(out);
                x.encode(out);
            }
            None => false.encode(out),
        }
    }
}

/// Writes the discriminant that makes a derived enum of `count` variants decode variant
/// `index`: the smallest `d` with `(d * count) >> 32 == index`.
pub fn variant(out: &mut Vec<u8>, index: u32, count: u32) {
    assert!(index < count, "variant {index} of {count}");
    let d = (u64::from(index) << 32).div_ceil(u64::from(count));
    let d = u32::try_from(d).expect("below 2^32 since index < count");
    d.encode(out);
}

/// Implements [`Encode`] for a struct by encoding the named fields in order: list them in
/// declaration order, all of them.
#[macro_export]
macro_rules! encode_struct {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::encode::Encode for $ty {
            fn encode(&self, out: &mut Vec<u8>) {
                $( $crate::encode::Encode::encode(&self.$field, out); )*
            }
        }
    };
}

/// Implements [`Encode`] for an enum: each arm is `Variant` or `Variant(a, b)` or
/// `Variant { a, b }`, in declaration order, every variant listed.
#[macro_export]
macro_rules! encode_enum {
    ($ty:ident { $($variant:ident $( ( $($tf:ident),* ) )? $( { $($sf:ident),* } )? ),* $(,)? }) => {
        impl $crate::encode::Encode for $ty {
            #[allow(unused_variables, unused_assignments)]
            fn encode(&self, out: &mut Vec<u8>) {
                let count = [$(stringify!($variant)),*].len() as u32;
                let mut index = 0u32;
                $(
                    if let $ty::$variant $( ( $($tf),* ) )? $( { $($sf),* } )? = self {
                        $crate::encode::variant(out, index, count);
                        $( $( $crate::encode::Encode::encode($tf, out); )* )?
                        $( $( $crate::encode::Encode::encode($sf, out); )* )?
                        return;
                    }
                    index += 1;
                )*
                unreachable!("every variant is listed");
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::{Arbitrary, Unstructured};

    #[derive(Arbitrary, Debug, PartialEq)]
    enum E {
        A,
        B(u16, bool),
        C { x: Option<u8>, v: Vec<u32> },
    }
    encode_enum!(E { A, B(a, b), C { x, v } });

    #[derive(Arbitrary, Debug, PartialEq)]
    struct S {
        a: u64,
        e: [E; 2],
        rest: Vec<E>,
    }
    encode_struct!(S { a, e, rest });

    #[test]
    fn values_decode_back_from_their_encoding() {
        let s = S {
            a: 0x0102_0304_0506_0708,
            e: [E::B(7, true), E::A],
            rest: vec![
                E::C {
                    x: Some(3),
                    v: vec![1, u32::MAX],
                },
                E::C { x: None, v: vec![] },
                E::A,
            ],
        };
        let mut bytes = Vec::new();
        s.encode(&mut bytes);
        let back = S::arbitrary_take_rest(Unstructured::new(&bytes)).expect("decodes");
        assert_eq!(back, s);
    }

    #[test]
    fn discriminants_select_every_variant_of_odd_counts() {
        for count in [1u32, 3, 7, 10, 33] {
            for index in 0..count {
                let mut out = Vec::new();
                variant(&mut out, index, count);
                let d = u32::from_le_bytes(out.try_into().expect("4 bytes"));
                assert_eq!((u64::from(d) * u64::from(count)) >> 32, u64::from(index));
            }
        }
    }
}

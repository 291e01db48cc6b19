//! Tests of the request codec.

//! Where media comes from. Only [`kvs`] knows the KVS SDK.

pub mod kvs;

//! vubd: a vhost-user-blk backend daemon.
//!
//! Layers, each using only those below it: `daemon` (wiring, lifecycle) → `vhost_user`
//! (control plane) → `poller` (data plane) → `virtio_blk` (request codec) → `bdev` (block
//! devices and their I/O channels) → `nvme` (NVMe wire types and transports) → `mem` (guest
//! memory). `log_limit` is a utility of them all: log lines a guest or a frontend can cause
//! go through a per-device rate limit. `metrics` (what the pollers count of each device's
//! requests, and how the daemon reads and exports it), `qos` (rate limits the pollers
//! enforce, lock-free) and `sandbox` (seccomp filters per thread role, restricted io_uring
//! rings) use none of them either, so any may use them; `clock` (the pollers' cheap clock,
//! which `metrics` and `qos` use), `error_chain` (an error and its causes on one line),
//! `jsonrpc` (JSON-RPC 2.0 over a stream), `systemd` (socket activation and service
//! notifications) and `units` (byte counts for people) are leaves;
//! `ctl` (the control socket's client) sits beside `daemon`.

pub mod bdev;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod error_chain;
pub mod jsonrpc;
pub mod log_limit;
pub mod mem;
pub mod metrics;
pub mod nvme;
pub mod poller;
pub mod qos;
pub mod sandbox;
pub mod systemd;
pub mod units;
pub mod vhost_user;
pub mod virtio_blk;

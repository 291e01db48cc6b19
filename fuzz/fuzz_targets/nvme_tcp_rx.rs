//! The NVMe/TCP receive path: a byte stream from a hostile controller, cut into reads of
//! arbitrary sizes, driven through `RxParser` the way a connection drives it.
//!
//! Checked beyond "no panic": every step makes progress, a C2HData is accepted exactly when
//! its data lies in the command's buffer and starts where the command's data so far ends,
//! payload stays inside the range the accepted C2HData announced, and a fatal error closes
//! the stream for good.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vubd::nvme::tcp::pdu::{Digests, IcReq, RxNeed, RxParser};
use vubd_fuzz::nvme_tcp::Input;

/// Most payload bytes one C2HData may carry in this harness.
const MAX_DATA: u32 = 1 << 16;

fn icresp(d: Digests) -> [u8; 128] {
    let mut b = [0; 128];
    b[..4].copy_from_slice(&[0x01, 0, 128, 0]);
    b[4..8].copy_from_slice(&128u32.to_le_bytes());
    b[11] = u8::from(d.header) | (u8::from(d.data) << 1);
    b[12..16].copy_from_slice(&8192u32.to_le_bytes());
    b
}

fuzz_target!(|input: Input| run(input));

fn run(input: Input) {
    let digests = Digests {
        header: input.header_digest,
        data: input.data_digest,
    };
    let mut p = RxParser::new(
        &IcReq {
            hpda: input.hpda,
            digests,
            maxr2t: 0,
        },
        MAX_DATA,
    );
    let mut stream = Vec::with_capacity(128 + input.stream.len());
    if input.valid_icresp {
        stream.extend_from_slice(&icresp(digests));
    }
    stream.extend_from_slice(&input.stream);
    let buffer_len = |cccid: u16| input.buffers.get(usize::from(cccid)).map(|&l| u32::from(l));

    let mut reads = input.reads.iter().map(|&r| usize::from(r).max(1));
    let (mut pos, mut avail) = (0usize, 0usize);
    // Payload bytes received per command.
    let mut received = vec![0u32; input.buffers.len()];
    // (command, start, end) of the accepted C2HData.
    let mut announced = (0u16, 0u64, 0u64);
    loop {
        if avail == 0 {
            if pos == stream.len() {
                break;
            }
            avail = reads.next().unwrap_or(usize::MAX).min(stream.len() - pos);
        }
        let chunk = &stream[pos..pos + avail];
        let outcome = match p.need() {
            RxNeed::Header { buf } | RxNeed::Padding { buf } | RxNeed::DataDigest { buf }
                if !input.use_feed =>
            {
                assert!(!buf.is_empty(), "asked for nothing");
                let n = buf.len().min(chunk.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                pos += n;
                avail -= n;
                p.filled(n)
            }
            RxNeed::Header { .. } | RxNeed::Padding { .. } | RxNeed::DataDigest { .. } => {
                let (n, r) = p.feed(chunk);
                assert!(n > 0 || !matches!(r, Ok(None)), "feed made no progress");
                pos += n;
                avail -= n;
                r
            }
            RxNeed::Accept {
                cccid,
                datao,
                datal,
            } => {
                assert!(datal > 0 && datal <= MAX_DATA);
                match buffer_len(cccid) {
                    Some(len) => {
                        let at = received[usize::from(cccid)];
                        let r = p.accept(len, at);
                        let end = u64::from(datao) + u64::from(datal);
                        assert_eq!(r.is_ok(), datao == at && end <= u64::from(len));
                        announced = (cccid, u64::from(datao), end);
                        r.map(|()| None)
                    }
                    None => Err(p.reject()),
                }
            }
            RxNeed::Payload {
                cccid,
                offset,
                remaining,
            } => {
                assert!(remaining > 0);
                let n = (remaining as usize).min(chunk.len());
                let (start, end) = (u64::from(offset), u64::from(offset) + n as u64);
                assert_eq!(cccid, announced.0);
                assert!(
                    announced.1 <= start && end <= announced.2,
                    "payload outside its PDU"
                );
                assert!(buffer_len(cccid).is_some_and(|l| end <= u64::from(l)));
                received[usize::from(cccid)] += n as u32;
                pos += n;
                avail -= n;
                p.payload_read(&chunk[..n])
            }
            RxNeed::Closed => break,
        };
        if trace() {
            eprintln!("{outcome:?}");
        }
        if let Err(e) = outcome
            && e.is_fatal()
        {
            assert!(matches!(p.need(), RxNeed::Closed));
            assert_eq!(p.filled(0), Err(e));
            let _ = e.term_req();
            assert!(p.header_in_error().len() <= 128);
            break;
        }
    }
}

/// `VUBD_FUZZ_TRACE` set: print what each step of the parser gave.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VUBD_FUZZ_TRACE").is_some())
}

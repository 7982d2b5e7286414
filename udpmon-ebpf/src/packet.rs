//! IPv4/IPv6 + UDP header parsing over any byte source (skb helpers or kernel reads).
use udpmon_common::event::{AF_INET, AF_INET6};

pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Something packet bytes can be copied out of.
pub trait Bytes {
    fn copy(&self, off: u32, dst: &mut [u8]) -> Option<()>;
}

/// An L3 header: family, source, destination, L4 protocol, offset of the L4 header.
pub struct L3 {
    pub family: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub proto: u8,
    pub l4_off: u32,
}

/// Parses the IP header at `off`. IPv6 extension headers are not walked: UDP and ICMPv6
/// follow the fixed header in every case udpmon reports on.
#[inline(always)]
pub fn l3<B: Bytes>(b: &B, off: u32) -> Option<L3> {
    let mut h = [0u8; 40];
    b.copy(off, &mut h[..20])?;
    match h[0] >> 4 {
        4 => {
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr[..4].copy_from_slice(&h[12..16]);
            daddr[..4].copy_from_slice(&h[16..20]);
            Some(L3 {
                family: AF_INET,
                saddr,
                daddr,
                proto: h[9],
                l4_off: off + ((h[0] & 0x0f) as u32) * 4,
            })
        }
        6 => {
            b.copy(off, &mut h)?;
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr.copy_from_slice(&h[8..24]);
            daddr.copy_from_slice(&h[24..40]);
            Some(L3 {
                family: AF_INET6,
                saddr,
                daddr,
                proto: h[6],
                l4_off: off + 40,
            })
        }
        _ => None,
    }
}

/// UDP ports (host order) and payload length.
#[inline(always)]
pub fn udp<B: Bytes>(b: &B, off: u32) -> Option<(u16, u16, u32)> {
    let mut h = [0u8; 8];
    b.copy(off, &mut h)?;
    let len = u16::from_be_bytes([h[4], h[5]]) as u32;
    Some((
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
        len.saturating_sub(8),
    ))
}

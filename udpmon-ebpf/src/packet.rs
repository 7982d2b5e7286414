//! IPv4/IPv6 + UDP header parsing: [`udp_words`] on the per-datagram paths, from headers
//! already copied into aligned words; [`l3`] and [`udp`] over any byte source elsewhere.
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

/// The first 48 bytes of an IP packet (IPv6 fixed header and UDP header; IPv4 needs 28),
/// as native-order words. Byte arrays would cost a byte-at-a-time memset and copy loop each
/// in BPF, words cost a load.
pub const HDR_WORDS: usize = 12;

/// What a datagram's headers say.
pub struct UdpHeaders {
    pub family: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// UDP payload length.
    pub bytes: u32,
}

/// IP version and L4 protocol from the first words of `w`: (version, protocol, IPv4
/// header length in bytes).
#[inline(always)]
pub fn ip_proto(w: impl Fn(usize) -> u32) -> (u8, u8, u32) {
    let b0 = w(0).to_ne_bytes();
    let version = b0[0] >> 4;
    let proto = if version == 4 {
        w(2).to_ne_bytes()[1]
    } else {
        w(1).to_ne_bytes()[2]
    };
    (version, proto, (b0[0] & 0x0f) as u32 * 4)
}

/// Parses a UDP datagram's headers from `w(i)`, word `i` of [`HDR_WORDS`]. IPv4 without
/// options (or with the UDP header moved to word 5 by the caller): words 0..7 are read.
#[inline(always)]
pub fn udp_words(w: impl Fn(usize) -> u32, v6: bool) -> UdpHeaders {
    let (family, saddr, daddr, ports, ulen) = if v6 {
        (
            AF_INET6,
            addr_bytes([w(2), w(3), w(4), w(5)]),
            addr_bytes([w(6), w(7), w(8), w(9)]),
            w(10),
            w(11),
        )
    } else {
        (
            AF_INET,
            addr_bytes([w(3), 0, 0, 0]),
            addr_bytes([w(4), 0, 0, 0]),
            w(5),
            w(6),
        )
    };
    let p = ports.to_ne_bytes();
    let l = ulen.to_ne_bytes();
    UdpHeaders {
        family,
        saddr,
        daddr,
        sport: u16::from_be_bytes([p[0], p[1]]),
        dport: u16::from_be_bytes([p[2], p[3]]),
        bytes: (u16::from_be_bytes([l[0], l[1]]) as u32).saturating_sub(8),
    }
}

/// An address as `Event` holds it (network order, IPv4 in the first 4 bytes), from words
/// loaded in native order.
#[inline(always)]
pub fn addr_bytes(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size and any bits are valid.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
}

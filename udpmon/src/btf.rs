//! Just enough of a reader for the kernel's raw BTF (Documentation/bpf/btf.rst) to find struct
//! member offsets, enumerator values and function parameter names at load time. Rust eBPF has no
//! CO-RE, and aya 0.14 keeps its BTF member lookup private, so the programs get their offsets
//! from here (see `udpmon_common::Offsets`).
use std::{error::Error, fmt, ops::Range, path::Path};

use udpmon_common::Offsets;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// Bounds typedef chains and anonymous-member nesting so malformed BTF cannot loop us forever.
const MAX_DEPTH: usize = 32;

/// The kernel's BTF. Type ids index `types`; id 0 is `void`. Only each type's header is
/// decoded up front: udpmon looks at a few dozen of the kernel's hundred thousand types, and
/// this runs at every start. Their members, enumerators and parameters are read from
/// `records` when asked for.
pub struct KernelBtf {
    types: Vec<Type>,
    /// The file as read: `records` and `strings` are where its sections are.
    bytes: Vec<u8>,
    /// The type section: what follows each type's header.
    records: Range<usize>,
    strings: Range<usize>,
}

#[derive(Default)]
struct Type {
    name: u32,
    kind: u8,
    /// Size for structs, unions, ints and enums; the referenced type for typedefs,
    /// qualifiers and FUNC (its FUNC_PROTO).
    size_or_type: u32,
    /// How many members, enumerators or parameters follow, at byte `at` of `records`.
    vlen: u16,
    kind_flag: bool,
    at: u32,
}

#[derive(Clone, Copy)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
    /// 0 unless the member is a bitfield.
    bits: u32,
}

#[derive(Debug)]
pub enum BtfError {
    Io {
        path: String,
        source: std::io::Error,
    },
    BadMagic(u16),
    /// The header, a section or a type record points outside the data or is inconsistent.
    Malformed(String),
    UnknownKind {
        id: u32,
        kind: u8,
    },
    NoStruct(String),
    NoMember {
        struct_name: String,
        path: String,
    },
    /// The member is a bitfield that does not cover whole bytes, so no byte offset can read it.
    NotByteAligned {
        struct_name: String,
        path: String,
        bit_offset: u32,
        bits: u32,
    },
    NoEnum(String),
    NoEnumerator {
        enum_name: String,
        variant: String,
    },
    NoFunc(String),
    /// An enumerator the programs compare against a `u32` does not fit in one.
    ValueRange {
        name: String,
        value: i64,
    },
    /// Which `Offsets` field could not be resolved, and why.
    Field {
        field: &'static str,
        source: Box<BtfError>,
    },
}

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, .. } => write!(f, "cannot read BTF from {path}"),
            Self::BadMagic(m) => write!(f, "not little-endian BTF: magic {m:#06x}"),
            Self::Malformed(what) => write!(f, "malformed BTF: {what}"),
            Self::UnknownKind { id, kind } => write!(f, "BTF type {id} has unknown kind {kind}"),
            Self::NoStruct(s) => write!(f, "no struct {s} in BTF"),
            Self::NoMember { struct_name, path } => {
                write!(f, "struct {struct_name} has no member {path}")
            }
            Self::NotByteAligned {
                struct_name,
                path,
                bit_offset,
                bits,
            } => write!(
                f,
                "struct {struct_name} member {path} is a {bits}-bit bitfield at bit {bit_offset}, \
                 not byte-addressable"
            ),
            Self::NoEnum(e) => write!(f, "no enum {e} in BTF"),
            Self::NoEnumerator { enum_name, variant } => {
                write!(f, "enum {enum_name} has no value {variant}")
            }
            Self::NoFunc(func) => write!(f, "no function {func} in BTF"),
            Self::ValueRange { name, value } => write!(f, "{name} = {value} does not fit in a u32"),
            Self::Field { field, .. } => write!(f, "cannot resolve offset {field}"),
        }
    }
}

impl Error for BtfError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Field { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

fn malformed(what: impl Into<String>) -> BtfError {
    BtfError::Malformed(what.into())
}

fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    b.get(pos..pos.checked_add(4)?)?
        .try_into()
        .ok()
        .map(u32::from_le_bytes)
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(bytes)
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Self, BtfError> {
        match bytes.get(..2).map(|m| u16::from_le_bytes([m[0], m[1]])) {
            Some(MAGIC) => {}
            Some(m) => return Err(BtfError::BadMagic(m)),
            None => return Err(malformed("shorter than its magic")),
        }
        let hdr = |i: usize| u32_at(&bytes, 4 + 4 * i).ok_or_else(|| malformed("truncated header"));
        // hdr_len may grow in future versions; the sections are relative to its end.
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (hdr(0)?, hdr(1)?, hdr(2)?, hdr(3)?, hdr(4)?);
        if (hdr_len as usize) < HEADER_LEN {
            return Err(malformed(format!("header length {hdr_len}")));
        }
        let section = |off: u32, len: u32, what: &str| {
            let start = hdr_len as usize + off as usize;
            let range = start..start + len as usize;
            match bytes.get(range.clone()) {
                Some(_) => Ok(range),
                None => Err(malformed(format!("{what} section out of bounds"))),
            }
        };
        let records = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?;

        let type_sec = &bytes[records.clone()];
        let (mut types, mut pos) = (vec![Type::default()], 0);
        while pos < type_sec.len() {
            let id = types.len() as u32;
            let (ty, len) = parse_type(type_sec, pos, id)?;
            types.push(ty);
            pos += len;
        }
        Ok(Self {
            types,
            bytes,
            records,
            strings,
        })
    }

    /// Byte offset of a dotted member path inside `struct <struct_name>`, looking through
    /// typedefs, qualifiers and anonymous structs/unions.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        // Several structs may share a name (distinct definitions that dedup could not merge);
        // the first one that has the path wins.
        let mut first_err = None;
        for id in self.ids_named(struct_name, &[KIND_STRUCT]) {
            match self.walk(id, struct_name, path) {
                Ok(off) => return Ok(off),
                Err(e) => _ = first_err.get_or_insert(e),
            }
        }
        Err(first_err.unwrap_or_else(|| BtfError::NoStruct(struct_name.to_owned())))
    }

    pub fn enum_value(&self, enum_name: &str, variant: &str) -> Result<i64, BtfError> {
        let mut found_enum = false;
        for id in self.ids_named(enum_name, &[KIND_ENUM, KIND_ENUM64]) {
            found_enum = true;
            if let Some(v) = self
                .enumerators(id)
                .find(|&(n, _)| self.is_named(n, variant))
            {
                return Ok(v.1);
            }
        }
        Err(if found_enum {
            BtfError::NoEnumerator {
                enum_name: enum_name.to_owned(),
                variant: variant.to_owned(),
            }
        } else {
            BtfError::NoEnum(enum_name.to_owned())
        })
    }

    /// Parameter names of `func`. Static functions sharing a name in different files each get a
    /// FUNC; the first one is used.
    pub fn func_params(&self, func: &str) -> Result<Vec<String>, BtfError> {
        let no_func = || BtfError::NoFunc(func.to_owned());
        let id = self
            .ids_named(func, &[KIND_FUNC])
            .next()
            .ok_or_else(no_func)?;
        let proto = self.types[id as usize].size_or_type;
        match self.params(proto) {
            Some(p) => Ok(p.map(|n| self.name(n).to_owned()).collect()),
            None => Err(malformed(format!("FUNC {func} has no FUNC_PROTO"))),
        }
    }

    #[cfg(test)]
    pub fn struct_size(&self, struct_name: &str) -> Result<u32, BtfError> {
        let id = self.ids_named(struct_name, &[KIND_STRUCT]).next();
        id.map(|id| self.types[id as usize].size_or_type)
            .ok_or_else(|| BtfError::NoStruct(struct_name.to_owned()))
    }

    pub fn has_func(&self, func: &str) -> bool {
        self.ids_named(func, &[KIND_FUNC]).next().is_some()
    }

    /// A tracepoint a tp_btf program can attach to: the kernel describes each with a
    /// `btf_trace_<name>` typedef.
    pub fn has_tracepoint(&self, tp: &str) -> bool {
        self.tracepoint_args(tp).is_some()
    }

    /// How many arguments a tp_btf program on `tp` gets: `btf_trace_<tp>` points to a
    /// prototype whose first parameter is the tracepoint's own `void *`, not an argument.
    pub fn tracepoint_args(&self, tp: &str) -> Option<usize> {
        let name = format!("btf_trace_{tp}");
        let id = self.ids_named(&name, &[KIND_TYPEDEF]).next()?;
        let ptr = self
            .types
            .get(self.types[id as usize].size_or_type as usize)?;
        if ptr.kind != KIND_PTR {
            return None;
        }
        Some(self.params(ptr.size_or_type)?.count().saturating_sub(1))
    }

    fn strings(&self) -> &[u8] {
        &self.bytes[self.strings.clone()]
    }

    fn records(&self) -> &[u8] {
        &self.bytes[self.records.clone()]
    }

    fn name(&self, off: u32) -> &str {
        // An offset or string that is out of range simply never matches a name we look for.
        let Some(tail) = self.strings().get(off as usize..) else {
            return "";
        };
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    }

    /// Whether the string at `off` is `name`, without measuring or checking the string first:
    /// [`Self::ids_named`] asks this of every type.
    fn is_named(&self, off: u32, name: &str) -> bool {
        let end = off as usize + name.len();
        let strings = self.strings();
        strings.get(off as usize..end) == Some(name.as_bytes()) && strings.get(end) == Some(&0)
    }

    fn ids_named<'a>(&'a self, name: &'a str, kinds: &'a [u8]) -> impl Iterator<Item = u32> + 'a {
        (1..self.types.len() as u32).filter(move |&id| {
            let t = &self.types[id as usize];
            kinds.contains(&t.kind) && self.is_named(t.name, name)
        })
    }

    /// Word `w` of record `r` of type `t`. In bounds: `parse_type` checked that the whole
    /// record fits.
    fn record(&self, t: &Type, r: usize, w: usize) -> u32 {
        let stride = trailer(t.kind).map_or(0, |(_, stride)| stride);
        u32_at(self.records(), t.at as usize + 4 * (r * stride + w)).unwrap_or(0)
    }

    /// (name, value) of each enumerator of `id`, if it is an enum.
    fn enumerators(&self, id: u32) -> impl Iterator<Item = (u32, i64)> + '_ {
        let t = &self.types[id as usize];
        let n = match t.kind {
            KIND_ENUM | KIND_ENUM64 => t.vlen as usize,
            _ => 0,
        };
        (0..n).map(move |r| {
            let lo = self.record(t, r, 1);
            // kind_flag marks a signed ENUM; ENUM64 keeps all 64 bits either way.
            let value = match (t.kind, t.kind_flag) {
                (KIND_ENUM64, _) => (u64::from(self.record(t, r, 2)) << 32 | u64::from(lo)) as i64,
                (_, true) => i64::from(lo as i32),
                (_, false) => i64::from(lo),
            };
            (self.record(t, r, 0), value)
        })
    }

    /// The parameter names of FUNC_PROTO `id`; `None` if it is not one.
    fn params(&self, id: u32) -> Option<impl Iterator<Item = u32> + '_> {
        let t = self.types.get(id as usize)?;
        (t.kind == KIND_FUNC_PROTO).then(|| (0..t.vlen as usize).map(move |r| self.record(t, r, 0)))
    }

    /// Members of `id` once typedefs and qualifiers are peeled off, if it is a struct or union.
    fn members_of(&self, mut id: u32) -> Option<Vec<Member>> {
        for _ in 0..MAX_DEPTH {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_STRUCT | KIND_UNION => {
                    let members = (0..t.vlen as usize).map(|r| {
                        let off = self.record(t, r, 2);
                        Member {
                            name: self.record(t, r, 0),
                            ty: self.record(t, r, 1),
                            bit_offset: if t.kind_flag { off & 0xff_ffff } else { off },
                            bits: if t.kind_flag { off >> 24 } else { 0 },
                        }
                    });
                    return Some(members.collect());
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return None,
            }
        }
        None
    }

    /// Finds `name` among `members`, descending into anonymous members (C11 anonymous
    /// structs/unions, the kernel's `struct_group`). Returns the member with its bit offset
    /// made relative to `members`' struct.
    fn find_member(&self, members: &[Member], name: &str, depth: usize) -> Option<Member> {
        if depth > MAX_DEPTH {
            return None;
        }
        members.iter().find_map(|m| match self.name(m.name) {
            n if n == name => Some(*m),
            "" => {
                let inner = self.find_member(&self.members_of(m.ty)?, name, depth + 1)?;
                Some(Member {
                    bit_offset: m.bit_offset.checked_add(inner.bit_offset)?,
                    ..inner
                })
            }
            _ => None,
        })
    }

    fn walk(&self, struct_id: u32, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        let no_member = || BtfError::NoMember {
            struct_name: struct_name.to_owned(),
            path: path.to_owned(),
        };
        let (mut ty, mut bit_offset, mut bits) = (struct_id, 0u32, 0u32);
        for part in path.split('.') {
            // An empty name would otherwise match the first anonymous member.
            if part.is_empty() {
                return Err(no_member());
            }
            let m = self.find_member(&self.members_of(ty).ok_or_else(no_member)?, part, 0);
            let m = m.ok_or_else(no_member)?;
            bit_offset = bit_offset.checked_add(m.bit_offset).ok_or_else(no_member)?;
            (ty, bits) = (m.ty, m.bits);
        }
        if bit_offset % 8 != 0 || bits % 8 != 0 {
            return Err(BtfError::NotByteAligned {
                struct_name: struct_name.to_owned(),
                path: path.to_owned(),
                bit_offset,
                bits,
            });
        }
        Ok(bit_offset / 8)
    }
}

/// What follows a type's common 3-word header: `extra` fixed words, then `vlen` records of
/// `stride` words. None for a kind udpmon does not know.
fn trailer(kind: u8) -> Option<(usize, usize)> {
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => (1, 0),
        KIND_ARRAY => (3, 0),
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => (0, 3),
        KIND_ENUM | KIND_FUNC_PROTO => (0, 2),
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => (0, 0),
        _ => return None,
    })
}

/// Decodes the type record at `pos`; returns it and its length in bytes.
fn parse_type(sec: &[u8], pos: usize, id: u32) -> Result<(Type, usize), BtfError> {
    let word = |i: usize| {
        u32_at(sec, pos + 4 * i).ok_or_else(|| malformed(format!("type {id} is truncated")))
    };
    let (name, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
    let vlen = (info & 0xffff) as usize;
    let kind = ((info >> 24) & 0x1f) as u8;
    let kind_flag = info >> 31 == 1;
    let (extra, stride) = trailer(kind).ok_or(BtfError::UnknownKind { id, kind })?;
    let words = 3 + extra + stride * vlen;
    // The whole record must fit even when nothing in its trailer is decoded.
    word(words - 1)?;
    let ty = Type {
        name,
        kind,
        size_or_type,
        vlen: vlen as u16,
        kind_flag,
        at: u32::try_from(pos + 4 * (3 + extra))
            .map_err(|_| malformed("type section over 4 GiB"))?,
    };
    Ok((ty, 4 * words))
}

/// Fills every `Offsets` field from `btf`. A missing `skb_drop_reason` enumerator (kernels
/// before 5.17 have no drop reasons) becomes `u32::MAX`, meaning "absent".
pub fn resolve_offsets(btf: &KernelBtf) -> Result<Offsets, BtfError> {
    let at = |field, name: &str, path: &str| btf.member_offset(name, path).map_err(in_field(field));
    let sk = |field, path| at(field, "sock", path);
    let skb = |field, path| at(field, "sk_buff", path);
    Ok(Offsets {
        skc_daddr: sk("skc_daddr", "__sk_common.skc_daddr")?,
        skc_rcv_saddr: sk("skc_rcv_saddr", "__sk_common.skc_rcv_saddr")?,
        skc_dport: sk("skc_dport", "__sk_common.skc_dport")?,
        skc_num: sk("skc_num", "__sk_common.skc_num")?,
        skc_family: sk("skc_family", "__sk_common.skc_family")?,
        skc_state: sk("skc_state", "__sk_common.skc_state")?,
        skc_v6_daddr: sk("skc_v6_daddr", "__sk_common.skc_v6_daddr")?,
        skc_v6_rcv_saddr: sk("skc_v6_rcv_saddr", "__sk_common.skc_v6_rcv_saddr")?,
        // possible_net_t is empty without CONFIG_NET_NS, so `.net` is resolved, not assumed 0.
        skc_net: sk("skc_net", "__sk_common.skc_net.net")?,
        sk_protocol: sk("sk_protocol", "sk_protocol")?,
        sk_type: sk("sk_type", "sk_type")?,
        sk_err: sk("sk_err", "sk_err")?,
        sk_error_queue_qlen: sk("sk_error_queue_qlen", "sk_error_queue.qlen")?,
        sk_uid: sk("sk_uid", "sk_uid.val")?,
        net_ns_inum: at("net_ns_inum", "net", "ns.inum")?,
        skb_head: skb("skb_head", "head")?,
        skb_data: skb("skb_data", "data")?,
        skb_len: skb("skb_len", "len")?,
        skb_network_header: skb("skb_network_header", "network_header")?,
        skb_transport_header: skb("skb_transport_header", "transport_header")?,
        skb_protocol: skb("skb_protocol", "protocol")?,
        skb_dev: skb("skb_dev", "dev")?,
        dev_nd_net: at("dev_nd_net", "net_device", "nd_net.net")?,
        drop_reason_no_socket: no_socket_reason(btf).map_err(in_field("drop_reason_no_socket"))?,
        // atomic64_t wraps `counter`; resolving it confirms the 8-byte read.
        skc_cookie: sk("skc_cookie", "__sk_common.skc_cookie.counter")?,
        skb_sk: skb("skb_sk", "sk")?,
        skb_refdst: skb("skb_refdst", "_skb_refdst")?,
        fl4_saddr: at("fl4_saddr", "flowi4", "saddr")?,
        fl4_daddr: at("fl4_daddr", "flowi4", "daddr")?,
        fl4_ports: at("fl4_ports", "flowi4", "uli.ports.dport")?,
        fl6_saddr: at("fl6_saddr", "flowi6", "saddr")?,
        fl6_daddr: at("fl6_daddr", "flowi6", "daddr")?,
        fl6_ports: at("fl6_ports", "flowi6", "uli.ports.dport")?,
        task_signal: at("task_signal", "task_struct", "signal")?,
        // atomic_t wraps `counter`.
        signal_live: at("signal_live", "signal_struct", "live.counter")?,
        file_inode: at("file_inode", "file", "f_inode")?,
        inode_mode: at("inode_mode", "inode", "i_mode")?,
        file_private_data: at("file_private_data", "file", "private_data")?,
        socket_sk: at("socket_sk", "socket", "sk")?,
        task_tgid: at("task_tgid", "task_struct", "tgid")?,
        task_pid: at("task_pid", "task_struct", "pid")?,
        task_flags: at("task_flags", "task_struct", "flags")?,
        task_comm: at("task_comm", "task_struct", "comm")?,
        task_cred: at("task_cred", "task_struct", "cred")?,
        // kuid_t wraps `val`.
        cred_uid: at("cred_uid", "cred", "uid.val")?,
        task_cgroups: at("task_cgroups", "task_struct", "cgroups")?,
        css_set_dfl_cgrp: at("css_set_dfl_cgrp", "css_set", "dfl_cgrp")?,
        cgroup_kn: at("cgroup_kn", "cgroup", "kn")?,
        kernfs_node_id: at("kernfs_node_id", "kernfs_node", "id")?,
    })
}

fn in_field(field: &'static str) -> impl FnOnce(BtfError) -> BtfError {
    move |e| BtfError::Field {
        field,
        source: Box::new(e),
    }
}

fn no_socket_reason(btf: &KernelBtf) -> Result<u32, BtfError> {
    const NAME: &str = "SKB_DROP_REASON_NO_SOCKET";
    match btf.enum_value("skb_drop_reason", NAME) {
        Ok(value) => u32::try_from(value).map_err(|_| {
            let name = NAME.to_owned();
            BtfError::ValueRange { name, value }
        }),
        Err(BtfError::NoEnum(_) | BtfError::NoEnumerator { .. }) => Ok(u32::MAX),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes raw BTF the way pahole lays it out, one type record at a time.
    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
        next_id: u32,
    }

    fn info(kind: u8, flag: bool, vlen: usize) -> u32 {
        u32::from(flag) << 31 | u32::from(kind) << 24 | vlen as u32
    }

    impl Builder {
        fn new() -> Self {
            let (types, strings) = (Vec::new(), vec![0]);
            Self {
                types,
                strings,
                next_id: 1,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            let off = self.strings.len() as u32;
            self.strings.extend(s.bytes().chain([0]));
            if s.is_empty() { 0 } else { off }
        }

        fn add_info(&mut self, name: &str, info: u32, size_or_type: u32, tail: &[u32]) -> u32 {
            let name = self.str(name);
            self.types
                .extend([name, info, size_or_type].iter().chain(tail));
            self.next_id += 1;
            self.next_id - 1
        }

        fn add(&mut self, name: &str, kind: u8, size_or_type: u32, tail: &[u32]) -> u32 {
            self.add_info(name, info(kind, false, 0), size_or_type, tail)
        }

        /// `members` are (name, type, offset word); any bitfield size in there sets kind_flag.
        fn composite(&mut self, kind: u8, name: &str, members: &[(&str, u32, u32)]) -> u32 {
            let mut tail = Vec::new();
            for &(n, ty, off) in members {
                tail.extend([self.str(n), ty, off]);
            }
            let flag = members.iter().any(|m| m.2 >> 24 != 0);
            self.add_info(name, info(kind, flag, members.len()), 8, &tail)
        }

        fn enumeration(&mut self, name: &str, signed: bool, values: &[(&str, i64)]) -> u32 {
            let mut tail = Vec::new();
            for &(n, v) in values {
                tail.extend([self.str(n), v as u32]);
            }
            self.add_info(name, info(KIND_ENUM, signed, values.len()), 4, &tail)
        }

        fn build(&self) -> Vec<u8> {
            let (type_len, str_len) = (4 * self.types.len() as u32, self.strings.len() as u32);
            let header = [HEADER_LEN as u32, 0, type_len, type_len, str_len];
            let mut out = vec![0x9f, 0xeb, 1, 0];
            for w in header.iter().chain(&self.types) {
                out.extend(w.to_le_bytes());
            }
            out.extend(&self.strings);
            out
        }
    }

    /// Every kind appears before the types under test, so a wrong record length for any of
    /// them garbles everything after it.
    fn sample() -> Builder {
        let mut b = Builder::new();
        let int = b.add("int", KIND_INT, 4, &[0x0100_0020]);
        let ushort = b.add("unsigned short", KIND_INT, 2, &[16]);
        let u16_t = b.add("u16", KIND_TYPEDEF, ushort, &[]);
        let ptr = b.add("", KIND_PTR, int, &[]);
        b.add("", KIND_ARRAY, 0, &[int, int, 4]);
        b.add("later", KIND_FWD, 0, &[]);
        b.add("double", KIND_FLOAT, 8, &[]);
        b.add("", KIND_RESTRICT, ptr, &[]);
        b.add("user", KIND_TYPE_TAG, ptr, &[]);
        let v = b.add("v", KIND_VAR, int, &[1]);
        b.add_info(".data", info(KIND_DATASEC, false, 1), 4, &[v, 0, 4]);
        b.add("tag", KIND_DECL_TAG, int, &[u32::MAX]);
        let huge = b.str("HUGE");
        b.add_info("big", info(KIND_ENUM64, false, 1), 8, &[huge, 2, 1]);
        b.enumeration("color", true, &[("RED", 0), ("NEG", -1)]);
        b.enumeration("color", false, &[("GREEN", 7)]);
        let (sk, len) = (b.str("sk"), b.str("len"));
        let proto = b.add_info(
            "",
            info(KIND_FUNC_PROTO, false, 2),
            int,
            &[sk, ptr, len, int],
        );
        b.add("f", KIND_FUNC, proto, &[]);
        b.add("broken", KIND_FUNC, int, &[]);

        let inner = b.composite(KIND_STRUCT, "inner", &[("a", int, 0), ("b", int, 32)]);
        let c = b.add("", KIND_CONST, inner, &[]);
        let inner_t = b.add("inner_t", KIND_TYPEDEF, c, &[]);
        let vol = b.add("", KIND_VOLATILE, inner_t, &[]);
        let lohi = b.composite(KIND_STRUCT, "", &[("lo", int, 0), ("hi", int, 32)]);
        let anon = b.composite(KIND_UNION, "", &[("pair", ptr, 0), ("", lohi, 0)]);
        let bitfield = |bits: u32, at: u32| bits << 24 | at;
        b.composite(
            KIND_STRUCT,
            "outer",
            &[
                ("hdr", u16_t, 0),
                ("flag", int, bitfield(3, 16)),
                ("proto", int, bitfield(8, 24)),
                ("", anon, 32),
                ("nested", vol, 96),
            ],
        );
        b.composite(KIND_STRUCT, "dup", &[]);
        b.composite(KIND_STRUCT, "dup", &[("x", int, 8)]);
        // Only malformed BTF has a typedef cycle; it must fail, not hang.
        let t1 = b.next_id + 1;
        b.composite(KIND_STRUCT, "looped", &[("m", t1, 0)]);
        b.add("t1", KIND_TYPEDEF, t1 + 1, &[]);
        b.add("t2", KIND_TYPEDEF, t1, &[]);
        b
    }

    fn btf() -> KernelBtf {
        KernelBtf::parse(sample().build()).expect("sample BTF parses")
    }

    /// The error and its sources, as a loader would log them.
    fn err<T: fmt::Debug>(r: Result<T, BtfError>) -> String {
        let e = r.expect_err("should fail");
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(inner) = cur {
            s += &format!(": {inner}");
            cur = inner.source();
        }
        s
    }

    #[test]
    fn btf_member_offsets() {
        let btf = btf();
        assert_eq!(btf.types.len(), sample().next_id as usize);
        let paths = [("hdr", 0), ("proto", 3), ("pair", 4), ("lo", 4), ("hi", 8)];
        let nested = [("nested", 12), ("nested.a", 12), ("nested.b", 16)];
        for (path, off) in paths.into_iter().chain(nested) {
            assert_eq!(btf.member_offset("outer", path).unwrap(), off, "{path}");
        }
        // The first `struct dup` lacks `x`; the second has it.
        assert_eq!(btf.member_offset("dup", "x").unwrap(), 1);
        assert_eq!(btf.struct_size("inner").unwrap(), 8);
    }

    #[test]
    fn btf_member_errors() {
        let btf = btf();
        // "" and "a..b" must not match anonymous members; `later` is only a FWD.
        for path in ["nested.c", "hdr.x", "", "nested..a", "nested.", "later"] {
            let e = err(btf.member_offset("outer", path));
            assert_eq!(e, format!("struct outer has no member {path}"));
        }
        assert_eq!(
            err(btf.member_offset("looped", "m.x")),
            "struct looped has no member m.x"
        );
        assert_eq!(
            err(btf.member_offset("outer", "flag")),
            "struct outer member flag is a 3-bit bitfield at bit 16, not byte-addressable"
        );
        for name in ["nope", "later", "color"] {
            assert_eq!(
                err(btf.member_offset(name, "a")),
                format!("no struct {name} in BTF")
            );
        }
        assert_eq!(err(btf.struct_size("nope")), "no struct nope in BTF");
    }

    #[test]
    fn btf_enums() {
        let btf = btf();
        assert_eq!(btf.enum_value("color", "RED").unwrap(), 0);
        assert_eq!(btf.enum_value("color", "NEG").unwrap(), -1);
        assert_eq!(btf.enum_value("color", "GREEN").unwrap(), 7);
        assert_eq!(btf.enum_value("big", "HUGE").unwrap(), 0x1_0000_0002);
        assert_eq!(
            err(btf.enum_value("color", "BLUE")),
            "enum color has no value BLUE"
        );
        assert_eq!(err(btf.enum_value("nope", "RED")), "no enum nope in BTF");
    }

    #[test]
    fn btf_funcs() {
        let btf = btf();
        assert_eq!(btf.func_params("f").unwrap(), ["sk", "len"]);
        assert!(btf.has_func("f") && !btf.has_func("nope") && !btf.has_func("inner"));
        assert_eq!(err(btf.func_params("nope")), "no function nope in BTF");
        assert_eq!(
            err(btf.func_params("broken")),
            "malformed BTF: FUNC broken has no FUNC_PROTO"
        );
    }

    #[test]
    fn btf_parse_errors() {
        let good = sample().build();
        let mut bad = good.clone();
        bad[0] = 0x9e;
        assert_eq!(
            err(KernelBtf::parse(bad).map(|_| ())),
            "not little-endian BTF: magic 0xeb9e"
        );
        let big_endian = KernelBtf::parse(vec![0xeb, 0x9f]).map(|_| ());
        assert_eq!(err(big_endian), "not little-endian BTF: magic 0x9feb");
        for (len, what) in [(1, "shorter than its magic"), (10, "truncated header")]
            .into_iter()
            .chain([(good.len() - 1, "string section out of bounds")])
        {
            let e = err(KernelBtf::parse(good[..len].to_vec()).map(|_| ()));
            assert_eq!(e, format!("malformed BTF: {what}"));
        }
        let mut b = Builder::new();
        b.add("int", KIND_INT, 4, &[]); // INT without its encoding word
        let e = err(KernelBtf::parse(b.build()).map(|_| ()));
        assert_eq!(e, "malformed BTF: type 1 is truncated");
        let mut b = Builder::new();
        b.add("x", 20, 0, &[]);
        let e = err(KernelBtf::parse(b.build()).map(|_| ()));
        assert_eq!(e, "BTF type 1 has unknown kind 20");
    }

    #[test]
    fn btf_offsets_name_the_field() {
        let e = err(resolve_offsets(&btf()));
        assert_eq!(e, "cannot resolve offset skc_daddr: no struct sock in BTF");
    }

    #[test]
    fn btf_drop_reason() {
        assert_eq!(no_socket_reason(&btf()).unwrap(), u32::MAX);
        let reason = |values: &[(&str, i64)]| {
            let mut b = Builder::new();
            b.enumeration("skb_drop_reason", true, values);
            no_socket_reason(&KernelBtf::parse(b.build()).unwrap())
        };
        assert_eq!(reason(&[("SKB_DROP_REASON_NO_SOCKET", 3)]).unwrap(), 3);
        assert_eq!(reason(&[("SKB_DROP_REASON_OTHER", 1)]).unwrap(), u32::MAX);
        let e = err(reason(&[("SKB_DROP_REASON_NO_SOCKET", -1)]));
        assert_eq!(e, "SKB_DROP_REASON_NO_SOCKET = -1 does not fit in a u32");
    }

    #[test]
    fn btf_real_vmlinux() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("\n*** SKIPPED: no {VMLINUX} (kernel without CONFIG_DEBUG_INFO_BTF?) ***\n");
            return;
        }
        let btf = KernelBtf::from_sys_fs().unwrap_or_else(|e| panic!("{}", err::<()>(Err(e))));
        let o = resolve_offsets(&btf).unwrap_or_else(|e| panic!("{}", err::<()>(Err(e))));
        // sock_common's head has had this layout since long before BTF existed.
        let head = [o.skc_daddr, o.skc_rcv_saddr, o.skc_dport, o.skc_num];
        assert_eq!((head, o.skc_family), ([0, 4, 12, 14], 16));
        assert!(o.skc_state > o.skc_family);
        assert!(o.skc_family < btf.struct_size("sock_common").unwrap());
        let sock = btf.struct_size("sock").unwrap();
        assert!(
            [o.sk_protocol, o.sk_type, o.sk_err, o.sk_uid]
                .iter()
                .all(|&f| f < sock)
        );
        let skb = btf.struct_size("sk_buff").unwrap();
        assert!(
            [o.skb_head, o.skb_network_header, o.skb_dev]
                .iter()
                .all(|&f| f < skb)
        );
        // flowi4 { common; saddr; daddr; uli } and flowi6 { common; daddr; saddr; ... uli }.
        assert_eq!(
            (o.fl4_daddr, o.fl4_ports),
            (o.fl4_saddr + 4, o.fl4_saddr + 8)
        );
        // The kprobe strategy reads each of these runs of fields with one helper call where
        // they lie as here, and a field at a time otherwise (udpmon-ebpf/src/kread.rs).
        assert_eq!(
            (o.fl6_saddr, o.fl6_ports),
            (o.fl6_daddr + 16, o.fl6_daddr + 36)
        );
        assert_eq!(o.skb_data, o.skb_head + 8);
        assert!(o.skb_sk < skb && o.skb_refdst < skb);
        assert!(btf.has_func("udp_send_skb") && btf.has_func("udp_v6_send_skb"));
        let task = btf.struct_size("task_struct").unwrap();
        assert!(
            [
                o.task_tgid,
                o.task_pid,
                o.task_flags,
                o.task_comm,
                o.task_cred,
                o.task_cgroups
            ]
            .iter()
            .all(|&f| f < task)
        );
        // Tracepoints every strategy attaches to, and one no kernel has.
        assert!(btf.has_tracepoint("consume_skb") && btf.has_tracepoint("kfree_skb"));
        assert!(!btf.has_tracepoint("udpmon_no_such_tracepoint"));
        // kfree_skb has had `location` since BTF exists; consume_skb since 6.3.
        assert!(btf.tracepoint_args("kfree_skb").unwrap() >= 2);
        assert!((1..=2).contains(&btf.tracepoint_args("consume_skb").unwrap()));
        assert_eq!(
            btf.func_params("udp_sendmsg").unwrap(),
            ["sk", "msg", "len"]
        );
        assert_eq!(
            btf.func_params("udp_recvmsg").unwrap()[..3],
            ["sk", "msg", "len"]
        );
        // Inlined into its callers, so it has no FUNC (KERNEL.md §1).
        assert!(btf.has_func("udp_sendmsg") && !btf.has_func("udp_lib_close"));
        let reuse = err(btf.member_offset("sock_common", "skc_reuse"));
        assert!(reuse.contains("4-bit bitfield"), "{reuse}");
        // The value moves between releases; 3 was read with bpftool on 6.18.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if release.starts_with("6.18.") {
            assert_eq!(o.drop_reason_no_socket, 3);
            assert_eq!(btf.tracepoint_args("consume_skb"), Some(2));
        }
        eprintln!("{release}{o:#?}");
    }
}

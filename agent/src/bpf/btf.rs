//! Field offsets of kernel structures, from the running kernel's BTF.
//!
//! The eBPF object is compiled once; the kernels it runs on lay out
//! `task_struct` and friends differently. Instead of CO-RE relocations
//! (which Rust eBPF cannot emit for these reads) the agent looks the offsets
//! up in `/sys/kernel/btf/vmlinux` and hands them to the programs before
//! load. Only struct/union members are resolved, which needs a small part of
//! the format; aya-obj keeps its BTF types crate-private.

use std::{collections::HashMap, path::Path};

use tollgate_common::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why offsets could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("cannot read kernel BTF {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF)")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The data is not BTF we understand.
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    /// A struct or member is missing on this kernel.
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Type {
    kind: u32,
    name: u32,
    /// `size` for structs, the referenced type for typedefs and qualifiers.
    size_or_type: u32,
    kind_flag: bool,
    members: Vec<Member>,
}

struct Member {
    name: u32,
    type_id: u32,
    offset: u32,
}

/// The parsed type section, enough to resolve member offsets.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

impl Btf {
    /// Parses the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    /// Parses a BTF file.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF bytes.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (big-endian BTF is not supported)"));
        }
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        // Type id 0 is void.
        let mut types = vec![Type { kind: 0, name: 0, size_or_type: 0, kind_flag: false, members: Vec::new() }];
        let mut at = header_len + type_off;
        let end = at + type_len;
        while at < end {
            let (name, info, size_or_type) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => 12,          // array
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push(Member { name: u32_at(m)?, type_id: u32_at(m + 4)?, offset: u32_at(m + 8)? });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // enum, func_proto
                15 | 19 => vlen * 12, // datasec, enum64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            types.push(Type { kind, name, size_or_type, kind_flag: info >> 31 == 1, members });
        }

        let mut btf = Self { types, strings, structs: HashMap::new() };
        for (id, ty) in btf.types.iter().enumerate() {
            if ty.kind == KIND_STRUCT && !ty.members.is_empty() {
                let name = btf.name(ty.name).to_owned();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, offset: u32) -> &str {
        let start = offset as usize;
        let Some(rest) = self.strings.get(start..) else { return "" };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = ty.size_or_type,
                _ => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name`, looking into anonymous
    /// structs and unions as C does.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self.structs.get(name).ok_or_else(|| BtfError::Missing(format!("struct {name}")))?;
        let ty = &self.types[id as usize];
        let bits = self.find_member(ty, member, 0).ok_or_else(|| BtfError::Missing(format!("{name}.{member}")))?;
        if bits % 8 != 0 {
            return Err(BtfError::Missing(format!("{name}.{member} at a byte offset (it is a bitfield)")));
        }
        Ok(bits / 8)
    }

    fn find_member(&self, ty: &Type, member: &str, base_bits: u32) -> Option<u32> {
        for m in &ty.members {
            let bits = base_bits + if ty.kind_flag { m.offset & 0x00ff_ffff } else { m.offset };
            if m.name == 0 {
                if let Some(inner) = self.resolve(m.type_id)
                    && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find_member(inner, member, bits)
                {
                    return Some(found);
                }
            } else if self.name(m.name) == member {
                return Some(bits);
            }
        }
        None
    }

    /// Every offset the programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let at = |s: &str, m: &str| self.member_offset(s, m);
        Ok(KernelOffsets {
            task_mm: at("task_struct", "mm")?,
            task_real_parent: at("task_struct", "real_parent")?,
            task_pid: at("task_struct", "pid")?,
            task_tgid: at("task_struct", "tgid")?,
            task_exit_code: at("task_struct", "exit_code")?,
            mm_exe_file: at("mm_struct", "exe_file")?,
            mm_arg_start: at("mm_struct", "arg_start")?,
            mm_arg_end: at("mm_struct", "arg_end")?,
            file_dentry: at("file", "f_path")? + at("path", "dentry")?,
            dentry_inode: at("dentry", "d_inode")?,
            inode_ino: at("inode", "i_ino")?,
            inode_sb: at("inode", "i_sb")?,
            sb_dev: at("super_block", "s_dev")?,
            bprm_file: at("linux_binprm", "file")?,
            bprm_filename: at("linux_binprm", "filename")?,
            bprm_interp: at("linux_binprm", "interp")?,
            reserved: 0,
            ready: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's kernel BTF: every offset resolves, and members
    /// inside anonymous structs (mm_struct's arg_start) are found.
    #[test]
    fn offsets_resolve_on_the_running_kernel() {
        let btf = Btf::from_sys_fs().expect("this kernel publishes BTF");
        let offsets = btf.kernel_offsets().expect("every member exists");
        assert!(offsets.task_tgid > offsets.task_pid.saturating_sub(8));
        assert!(offsets.mm_arg_end > offsets.mm_arg_start);
        assert_eq!(offsets.ready, 1);
        assert!(matches!(btf.member_offset("task_struct", "no_such_member"), Err(BtfError::Missing(_))));
    }
}

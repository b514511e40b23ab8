//! Exec allow lists: from what a policy names (files, directories, globs)
//! to the files they are now, by device and inode, as the kernel sees an
//! exec. Only files owned by root and writable by nobody else are listed:
//! a file a session could write, or put in a listed place, would let it run
//! anything. The dynamic loader is never on the list: run as a program it
//! executes any file it is given, whatever the list says.

use std::{
    collections::BTreeSet,
    fmt,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de};

use super::compile::FileId;

/// Files one directory pattern may stand for at most: a list that names `/`
/// must not make the daemon walk the whole filesystem.
const MAX_FILES_PER_PATTERN: usize = 200_000;

/// What `exec.allow` names: a file, a directory (`/usr/bin/`: every file
/// below it) or a glob (`/usr/lib/git-core/git-*`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExecPattern(pub String);

impl fmt::Display for ExecPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ExecPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if !text.starts_with('/') {
            return Err(de::Error::custom(format!("exec path '{text}' must be absolute")));
        }
        if let Err(e) = glob::Pattern::new(&text) {
            return Err(de::Error::custom(format!("exec pattern '{text}' is not valid: {e}")));
        }
        Ok(Self(text))
    }
}

/// The files an allow list stands for now.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Every file, by the path that named it.
    pub files: Vec<(PathBuf, FileId)>,
    /// Loaders found as the interpreter of listed files, left off the list.
    pub loaders: Vec<PathBuf>,
}

/// The files `pattern` names now (directories walked, globs expanded,
/// symlinks followed to the file they name).
fn expand(pattern: &ExecPattern) -> Vec<PathBuf> {
    let text = pattern.0.as_str();
    let roots: Vec<PathBuf> = if text.contains(['*', '?', '[']) {
        glob::glob(text).map(|paths| paths.flatten().collect()).unwrap_or_default()
    } else {
        vec![PathBuf::from(text)]
    };
    let mut files = Vec::new();
    for root in roots {
        if root.is_dir() {
            walk(&root, &mut files);
        } else if root.is_file() {
            files.push(root);
        }
    }
    files
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if files.len() >= MAX_FILES_PER_PATTERN {
            tracing::warn!(dir = %dir.display(), "exec.allow names more files than are taken from one pattern");
            return;
        }
        let path = entry.path();
        // Symlinked directories are not followed: a link can point anywhere.
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => walk(&path, files),
            Ok(_) if path.is_file() => files.push(path),
            _ => {}
        }
    }
}

/// The ELF interpreter (`PT_INTERP`) a file asks for, if it is a dynamic ELF executable.
pub fn elf_interpreter(path: &Path) -> Option<PathBuf> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut head = vec![0u8; 4096];
    let read = file.read(&mut head).ok()?;
    let head = &head[..read];
    // ELF, 64-bit, little-endian (what this agent runs on).
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let u16_at = |at: usize| head.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |at: usize| head.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (phoff, phentsize, phnum) = (u64_at(32)? as usize, usize::from(u16_at(54)?), usize::from(u16_at(56)?));
    for index in 0..phnum {
        let at = phoff + index * phentsize;
        let kind = head.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
        if kind == 3 {
            // PT_INTERP: a NUL-terminated path at p_offset, p_filesz long.
            let (offset, size) = (u64_at(at + 8)? as usize, u64_at(at + 32)? as usize);
            let bytes = head.get(offset..offset + size)?;
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            return std::str::from_utf8(&bytes[..end]).ok().map(PathBuf::from);
        }
    }
    None
}

/// Names the dynamic loaders go by (glibc's for each architecture, musl's).
fn is_loader_name(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("ld-linux")
        || name.starts_with("ld-musl")
        || name.starts_with("ld.so")
        || name.starts_with("ld64.so")
}

/// Owned by root and writable by no one else (the file itself; replacing it
/// makes another file, which is judged again).
fn trusted(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.uid() == 0 && meta.mode() & 0o022 == 0)
}

/// The files `patterns` stand for now, without the loaders their programs
/// use (which could run anything) and without files others than root could write.
pub fn resolve(patterns: &[ExecPattern]) -> Resolved {
    let mut files: Vec<(PathBuf, FileId)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut loaders: BTreeSet<PathBuf> = BTreeSet::new();
    for pattern in patterns {
        for path in expand(pattern) {
            if !trusted(&path) {
                tracing::warn!(path = %path.display(), "left off the exec allow list: not owned by root, or writable by others");
                continue;
            }
            if is_loader_name(&path) {
                loaders.insert(path);
                continue;
            }
            let Ok(id) = FileId::of(&path) else { continue };
            if let Some(interpreter) = elf_interpreter(&path) {
                loaders.insert(interpreter);
            }
            if seen.insert(id) {
                files.push((path, id));
            }
        }
    }
    let loader_ids: BTreeSet<FileId> = loaders.iter().filter_map(|path| FileId::of(path).ok()).collect();
    files.retain(|(path, id)| {
        let loader = loader_ids.contains(id);
        if loader {
            tracing::info!(path = %path.display(), "the dynamic loader is never on an exec allow list");
        }
        !loader
    });
    Resolved { files, loaders: loaders.into_iter().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_of_listed_programs_is_left_off_the_list() {
        let sh = std::fs::canonicalize("/bin/sh").expect("/bin/sh");
        let loader = elf_interpreter(&sh).expect("/bin/sh is a dynamic ELF program here");
        let loader_dir = loader.parent().expect("the loader has a directory").to_str().expect("UTF-8").to_owned();
        let resolved = resolve(&[ExecPattern(sh.display().to_string()), ExecPattern(format!("{loader_dir}/"))]);
        let loader_id = FileId::of(&loader).expect("loader");
        assert!(resolved.files.iter().any(|(_, id)| *id == FileId::of(&sh).expect("sh")), "sh is listed");
        assert!(resolved.files.iter().all(|(_, id)| *id != loader_id), "the loader must not be listed");
        assert!(resolved.loaders.contains(&loader));
    }

    #[test]
    fn globs_and_directories_expand_to_what_is_there() {
        let dir = std::env::temp_dir().join(format!("tollgate-exec-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("dirs");
        for name in ["git-a", "git-b", "other", "sub/deep"] {
            std::fs::write(dir.join(name), "x").expect("file");
        }
        let base = dir.display();
        let glob = resolve(&[ExecPattern(format!("{base}/git-*"))]);
        assert_eq!(glob.files.len(), 2, "{glob:?}");
        let whole = resolve(&[ExecPattern(format!("{base}/"))]);
        assert_eq!(whole.files.len(), 4, "{whole:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

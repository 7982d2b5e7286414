use super::Hook;

pub fn hooks(_btf: &crate::btf::KernelBtf) -> Vec<Hook> {
    Vec::new()
}

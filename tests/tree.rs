//! Tree files: a JSON list of paths loads as the default tree does (the buffers themselves are
//! unit-tested next to their code in train/decode/tree.rs).
use clover::decode::tree::{mc_sim_7b_63, Tree};
use tch::Device;

#[test]
fn json_tree_file_round_trips_and_verify_mask_shape() {
    let dir = crate::common::scratch_dir("tree", "json-file");
    let file = dir.join("tree.json");
    std::fs::write(&file, serde_json::to_string(&mc_sim_7b_63()).unwrap()).unwrap();
    let t = Tree::load(Some(file.to_str().unwrap())).unwrap();
    assert_eq!(t.tree_indices, Tree::load(None).unwrap().tree_indices);
    std::fs::write(&file, "{\"not\": \"a list\"}").unwrap();
    assert!(Tree::load(Some(file.to_str().unwrap())).is_err());

    let tt = t.to_device(Device::Cpu);
    let m = tt.verify_mask(7);
    assert_eq!(m.size(), vec![1, 1, 26, 33]);
    let m: Vec<bool> = Vec::try_from(m.flatten(0, -1)).unwrap();
    for i in 0..26 {
        for j in 0..33 {
            let want = j < 7 || t.attn_mask[i][j - 7];
            assert_eq!(m[i * 33 + j], want);
        }
    }
}

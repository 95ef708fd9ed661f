//! Default tree buffers against docs/clover2.md §4.2 / §4.4, and explicit-parent handling (G11).
use clover::decode::tree::{mc_sim_7b_63, Tree, DEFAULT_TOP_K};
use tch::Device;

fn default_tree() -> Tree {
    Tree::load(None).expect("default tree")
}

#[test]
fn default_tree_has_26_tokens_and_depth_counts() {
    let t = default_tree();
    assert_eq!(t.len(), 26);
    assert_eq!(t.max_depth(), 5);
    let mut counts = [0usize; 6];
    for p in &t.paths {
        counts[p.len()] += 1;
    }
    assert_eq!(counts, [1, 4, 8, 8, 3, 2]);
    assert_eq!(t.retrieve_indices.len(), 15);
}

#[test]
fn default_position_ids_are_depths() {
    let want: Vec<i64> = std::iter::once(0)
        .chain([1; 4])
        .chain([2; 8])
        .chain([3; 8])
        .chain([4; 3])
        .chain([5; 2])
        .collect();
    assert_eq!(default_tree().position_ids, want);
}

#[test]
fn default_tree_indices_equal_spec() {
    let want = vec![
        0, 1, 2, 3, 4, 11, 12, 13, 21, 22, 31, 32, 41, 51, 52, 53, 61, 62, 71, 72, 81, 91, 92, 93,
        101, 102,
    ];
    assert_eq!(default_tree().tree_indices, want);
}

#[test]
fn default_retrieve_indices_equal_spec() {
    let m = -1;
    let want: Vec<Vec<i64>> = vec![
        vec![0, 1, 5, 13, 21, 24],
        vec![0, 1, 5, 13, 21, 25],
        vec![0, 1, 5, 13, 22, m],
        vec![0, 1, 5, 13, 23, m],
        vec![0, 1, 5, 14, m, m],
        vec![0, 1, 5, 15, m, m],
        vec![0, 1, 6, 16, m, m],
        vec![0, 1, 6, 17, m, m],
        vec![0, 1, 7, 18, m, m],
        vec![0, 1, 7, 19, m, m],
        vec![0, 2, 8, 20, m, m],
        vec![0, 2, 9, m, m, m],
        vec![0, 3, 10, m, m, m],
        vec![0, 3, 11, m, m, m],
        vec![0, 4, 12, m, m, m],
    ];
    assert_eq!(default_tree().retrieve_indices, want);
}

#[test]
fn default_attn_mask_is_diagonal_root_and_ancestors() {
    let t = default_tree();
    // Spell the mask out from the paths independently of the builder: j is visible to i iff
    // path(j) is a prefix of path(i).
    let paths = &t.paths;
    for i in 0..26 {
        for j in 0..26 {
            let want = paths[i].starts_with(&paths[j]);
            assert_eq!(t.attn_mask[i][j], want, "mask[{i}][{j}]");
        }
    }
    // Spot checks from docs/clover2.md §4.4: column 0 everywhere, diagonal, and node 24 = [0,0,0,0,0]
    // sees exactly 0,1,5,13,21,24.
    assert!((0..26).all(|i| t.attn_mask[i][0] && t.attn_mask[i][i]));
    let row24: Vec<usize> = (0..26).filter(|&j| t.attn_mask[24][j]).collect();
    assert_eq!(row24, vec![0, 1, 5, 13, 21, 24]);
    assert_eq!(
        t.attn_mask.iter().flatten().filter(|&&b| b).count(),
        26 + 25 + 21 + 13 + 5 + 2
    );
}

#[test]
fn default_draft_plan_equals_spec_4_2() {
    let t = default_tree();
    let internal: Vec<usize> = t.draft_plan.iter().map(|s| s.nodes.len()).collect();
    assert_eq!(internal, vec![4, 4, 1, 1]);
    let gathers: Vec<Vec<i64>> = t.draft_plan.iter().map(|s| s.gather.clone()).collect();
    assert_eq!(
        gathers,
        vec![vec![0, 1, 2, 3], vec![0, 1, 2, 10], vec![0], vec![0]]
    );
    let repeat_nums: Vec<Vec<usize>> = t
        .draft_plan
        .iter()
        .map(|s| run_lengths(&s.parent_rows))
        .collect();
    assert_eq!(repeat_nums, vec![vec![4], vec![3, 1], vec![1], vec![1]]);
    let expanded: Vec<Vec<Vec<usize>>> = t
        .draft_plan
        .iter()
        .map(|s| s.nodes.iter().map(|&n| t.paths[n].clone()).collect())
        .collect();
    assert_eq!(
        expanded,
        vec![
            vec![vec![0], vec![1], vec![2], vec![3]],
            vec![vec![0, 0], vec![0, 1], vec![0, 2], vec![1, 0]],
            vec![vec![0, 0, 0]],
            vec![vec![0, 0, 0, 0]],
        ]
    );
    assert_eq!(t.n_draft_rows(), 11);
}

fn run_lengths(v: &[i64]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for (i, x) in v.iter().enumerate() {
        if i > 0 && v[i - 1] == *x {
            *out.last_mut().unwrap() += 1;
        } else {
            out.push(1);
        }
    }
    out
}

/// G11: here the depth-2 internal node hangs under the SECOND depth-1 node only, so the parents
/// are not a prefix of the previous depth; the reference's bias counter would gather from row 0.
#[test]
fn explicit_parents_handle_non_prefix_trees() {
    let paths = vec![vec![0], vec![1], vec![1, 0], vec![1, 0, 3], vec![0, 2]];
    let t = Tree::from_paths(&paths, 4).unwrap();
    // node order: root, [0], [1], [0,2], [1,0], [1,0,3]
    assert_eq!(t.paths[4], vec![1, 0]);
    assert_eq!(t.draft_plan.len(), 2);
    // depth 1: internal [0] and [1] from the root row
    assert_eq!(t.draft_plan[0].gather, vec![0, 1]);
    // depth 2: only [1,0] is internal; its parent [1] is row 1 of step 1 -> 1*4 + 0
    assert_eq!(t.draft_plan[1].gather, vec![4]);
    assert_eq!(t.draft_plan[1].parent_rows, vec![1]);
    // draft rows: root 0, [0] 1, [1] 2, [1,0] 3 -> [1,0,3] at 1 + 3*4 + 3
    assert_eq!(
        t.tree_indices,
        vec![0, 1, 2, 1 + 4 + 2, 1 + 2 * 4, 1 + 3 * 4 + 3]
    );
    assert!(!t.children_are_contiguous()); // [0] has only child rank 2
}

#[test]
fn bad_trees_are_rejected() {
    assert!(
        Tree::from_paths(&[vec![0, 1]], 10).is_err(),
        "missing parent"
    );
    assert!(
        Tree::from_paths(&[vec![0], vec![0]], 10).is_err(),
        "duplicate"
    );
    assert!(
        Tree::from_paths(&[vec![10]], DEFAULT_TOP_K).is_err(),
        "rank >= top-k"
    );
    assert!(Tree::from_paths(&[], 10).is_err(), "empty");
}

#[test]
fn json_tree_file_round_trips_and_verify_mask_shape() {
    let dir = crate::common::scratch_dir("tree", "json-file");
    let file = dir.join("tree.json");
    std::fs::write(&file, serde_json::to_string(&mc_sim_7b_63()).unwrap()).unwrap();
    let t = Tree::load(Some(file.to_str().unwrap())).unwrap();
    assert_eq!(t.tree_indices, default_tree().tree_indices);
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

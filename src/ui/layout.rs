//! A layered (Sugiyama-style) layout of a directed graph, top to bottom, for the canvas.
//!
//! 1. Cycles are broken by reversing the back edges of a depth-first search (a compiled
//!    flow is acyclic; this only keeps the function total).
//! 2. Longest-path layering: a node sits one layer below the lowest of its predecessors.
//! 3. An edge that spans several layers gets a dummy node in each layer it crosses, so it is
//!    routed around boxes rather than through them.
//! 4. Ordering within a layer: barycenter sweeps down and up, keeping the order with the
//!    fewest crossings.
//! 5. Coordinates: each node is pulled toward the mean x of its neighbours in the layer
//!    above, then pushed right to keep the gap; the drawing is shifted to start at the
//!    margin.
//!
//! Pure and deterministic: the same graph always gets the same picture. A hand-written
//! ~200 lines instead of a crate: the layout crates on crates.io either pull in a rendering
//! stack (`layout-rs` draws its own SVG with its own text model) or are unmaintained, and
//! the canvas needs its own boxes (kind, name, id, numbers) sized by the caller.

/// The size of a node's box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Size {
    pub w: f64,
    pub h: f64,
}

/// Where a node's box sits: its top-left corner and size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Rect {
    fn bottom_center(&self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y + self.h)
    }
    fn top_center(&self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// One per input node, in input order.
    pub nodes: Vec<Rect>,
    /// One polyline per input edge, in input order: from the bottom of its source to the
    /// top of its target, through the dummy points of the layers between.
    pub edges: Vec<Vec<(f64, f64)>>,
    /// The layer of each input node (0 at the top).
    pub layers: Vec<usize>,
    pub width: f64,
    pub height: f64,
}

const MARGIN: f64 = 20.0;
const GAP_X: f64 = 40.0;
const GAP_Y: f64 = 60.0;
const DUMMY_W: f64 = 12.0;
const SWEEPS: usize = 12;

/// Lay out `sizes.len()` nodes joined by `edges` (`(from, to)` indices; out-of-range and
/// self edges are drawn as nothing).
pub fn layout(sizes: &[Size], edges: &[(usize, usize)]) -> Layout {
    let n = sizes.len();
    let valid = |&(a, b): &(usize, usize)| a < n && b < n && a != b;
    // 1. Break cycles: an edge into a node still on the DFS stack is reversed.
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(a, b) in edges.iter().filter(|e| valid(e)) {
        out[a].push(b);
    }
    let mut state = vec![0u8; n]; // 0 new, 1 on stack, 2 done
    let mut back = std::collections::BTreeSet::new();
    for root in 0..n {
        if state[root] != 0 {
            continue;
        }
        let mut stack = vec![(root, 0usize)];
        state[root] = 1;
        while let Some(&mut (v, ref mut i)) = stack.last_mut() {
            if let Some(&w) = out[v].get(*i) {
                *i += 1;
                match state[w] {
                    0 => {
                        state[w] = 1;
                        stack.push((w, 0));
                    }
                    1 => {
                        back.insert((v, w));
                    }
                    _ => {}
                }
            } else {
                state[v] = 2;
                stack.pop();
            }
        }
    }
    let dag: Vec<(usize, usize)> = edges
        .iter()
        .filter(|e| valid(e))
        .map(|&(a, b)| {
            if back.contains(&(a, b)) {
                (b, a)
            } else {
                (a, b)
            }
        })
        .collect();

    // 2. Longest-path layering, in topological order (Kahn, smallest index first).
    let mut indegree = vec![0usize; n];
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(a, b) in &dag {
        indegree[b] += 1;
        succ[a].push(b);
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&v| indegree[v] == 0).collect();
    let mut layer = vec![0usize; n];
    while let Some(v) = ready.pop_first() {
        for &w in &succ[v] {
            layer[w] = layer[w].max(layer[v] + 1);
            indegree[w] -= 1;
            if indegree[w] == 0 {
                ready.insert(w);
            }
        }
    }

    // 3. Dummy nodes: the chain of each edge, real ends included.
    let mut widths: Vec<f64> = sizes.iter().map(|s| s.w).collect();
    let mut level = layer.clone();
    let mut chains: Vec<Vec<usize>> = Vec::with_capacity(edges.len());
    let mut dag_iter = dag.iter();
    for e in edges {
        if !valid(e) {
            chains.push(Vec::new());
            continue;
        }
        let Some(&(a, b)) = dag_iter.next() else {
            chains.push(Vec::new());
            continue;
        };
        let mut chain = vec![a];
        for l in layer[a] + 1..layer[b] {
            widths.push(DUMMY_W);
            level.push(l);
            chain.push(widths.len() - 1);
        }
        chain.push(b);
        if back.contains(e) {
            chain.reverse();
        }
        chains.push(chain);
    }
    let total = widths.len();
    let depth = level.iter().copied().max().map_or(0, |d| d + 1);
    let mut up: Vec<Vec<usize>> = vec![Vec::new(); total];
    let mut down: Vec<Vec<usize>> = vec![Vec::new(); total];
    for chain in &chains {
        for pair in chain.windows(2) {
            let (a, b) = if level[pair[0]] < level[pair[1]] {
                (pair[0], pair[1])
            } else {
                (pair[1], pair[0])
            };
            down[a].push(b);
            up[b].push(a);
        }
    }

    // 4. Ordering: barycenter sweeps; the best order seen wins.
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); depth];
    for v in 0..total {
        rows[level[v]].push(v);
    }
    let mut pos = vec![0usize; total];
    let index = |rows: &[Vec<usize>], pos: &mut [usize]| {
        for row in rows {
            for (i, &v) in row.iter().enumerate() {
                pos[v] = i;
            }
        }
    };
    index(&rows, &mut pos);
    let mut best = (crossings(&rows, &down, &pos), rows.clone());
    for sweep in 0..SWEEPS {
        let downward = sweep % 2 == 0;
        let order: Vec<usize> = if downward {
            (1..depth).collect()
        } else {
            (0..depth.saturating_sub(1)).rev().collect()
        };
        for l in order {
            let keys: Vec<(f64, usize)> = rows[l]
                .iter()
                .map(|&v| {
                    let near = if downward { &up[v] } else { &down[v] };
                    let bary = if near.is_empty() {
                        pos[v] as f64
                    } else {
                        near.iter().map(|&u| pos[u] as f64).sum::<f64>() / near.len() as f64
                    };
                    (bary, pos[v])
                })
                .collect();
            let mut row: Vec<(f64, usize, usize)> = rows[l]
                .iter()
                .zip(keys)
                .map(|(&v, (b, p))| (b, p, v))
                .collect();
            row.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            rows[l] = row.into_iter().map(|(_, _, v)| v).collect();
            for (i, &v) in rows[l].iter().enumerate() {
                pos[v] = i;
            }
        }
        let c = crossings(&rows, &down, &pos);
        if c < best.0 {
            best = (c, rows.clone());
        }
    }
    let rows = best.1;
    index(&rows, &mut pos);

    // 5. Coordinates.
    let mut heights = vec![0.0f64; depth];
    for (v, s) in sizes.iter().enumerate() {
        heights[level[v]] = heights[level[v]].max(s.h);
    }
    let mut top = vec![MARGIN; depth];
    for l in 1..depth {
        top[l] = top[l - 1] + heights[l - 1] + GAP_Y;
    }
    let mut cx = vec![0.0f64; total];
    for row in &rows {
        let mut x = 0.0;
        for &v in row {
            cx[v] = x + widths[v] / 2.0;
            x += widths[v] + GAP_X;
        }
    }
    // Pull each node toward its neighbours above (down the layers), then below (up the
    // layers), a few rounds; each layer keeps its order and its gaps.
    for round in 0..4 {
        let downward = round % 2 == 0;
        let layers: Vec<usize> = if downward {
            (1..depth).collect()
        } else {
            (0..depth.saturating_sub(1)).rev().collect()
        };
        for l in layers {
            let row = &rows[l];
            let want: Vec<f64> = row
                .iter()
                .map(|&v| {
                    let near = if downward { &up[v] } else { &down[v] };
                    if near.is_empty() {
                        cx[v]
                    } else {
                        near.iter().map(|&u| cx[u]).sum::<f64>() / near.len() as f64
                    }
                })
                .collect();
            for (v, x) in row.iter().zip(spread(row, &want, &widths)) {
                cx[*v] = x;
            }
        }
    }
    let left = (0..total)
        .map(|v| cx[v] - widths[v] / 2.0)
        .fold(f64::INFINITY, f64::min);
    let shift = if left.is_finite() { MARGIN - left } else { 0.0 };
    let nodes: Vec<Rect> = sizes
        .iter()
        .enumerate()
        .map(|(v, s)| Rect {
            x: cx[v] + shift - s.w / 2.0,
            y: top[level[v]],
            w: s.w,
            h: s.h,
        })
        .collect();
    let edges = chains
        .iter()
        .map(|chain| {
            let (Some(&first), Some(&last)) = (chain.first(), chain.last()) else {
                return Vec::new();
            };
            let mut points = vec![nodes[first].bottom_center()];
            for &d in &chain[1..chain.len() - 1] {
                let y = top[level[d]];
                let x = cx[d] + shift;
                points.push((x, y));
                points.push((x, y + heights[level[d]]));
            }
            points.push(nodes[last].top_center());
            points
        })
        .collect();
    let width = (0..total)
        .map(|v| cx[v] + shift + widths[v] / 2.0)
        .fold(0.0, f64::max)
        + MARGIN;
    let height =
        top.last().copied().unwrap_or(0.0) + heights.last().copied().unwrap_or(0.0) + MARGIN;
    Layout {
        nodes,
        edges,
        layers: layer,
        width,
        height,
    }
}

/// Centres as close to `want` as the gaps allow, in the row's order: the mean of the
/// leftmost and the rightmost placement that keep every gap (each keeps them, so their mean
/// does too).
fn spread(row: &[usize], want: &[f64], widths: &[f64]) -> Vec<f64> {
    let gap = |i: usize| (widths[row[i - 1]] + widths[row[i]]) / 2.0 + GAP_X;
    let mut left = want.to_vec();
    for i in 1..row.len() {
        left[i] = left[i].max(left[i - 1] + gap(i));
    }
    let mut right = want.to_vec();
    for i in (1..row.len()).rev() {
        right[i - 1] = right[i - 1].min(right[i] - gap(i));
    }
    left.iter()
        .zip(&right)
        .map(|(l, r)| (l + r) / 2.0)
        .collect()
}

/// Edge crossings between consecutive layers for the order `pos`.
fn crossings(rows: &[Vec<usize>], down: &[Vec<usize>], pos: &[usize]) -> usize {
    let mut total = 0;
    for row in rows {
        let mut pairs: Vec<(usize, usize)> = row
            .iter()
            .flat_map(|&v| down[v].iter().map(move |&w| (pos[v], pos[w])))
            .collect();
        pairs.sort_unstable();
        for i in 0..pairs.len() {
            for j in i + 1..pairs.len() {
                if pairs[i].0 < pairs[j].0 && pairs[i].1 > pairs[j].1 {
                    total += 1;
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes(n: usize) -> Vec<Size> {
        (0..n)
            .map(|i| Size {
                w: 100.0 + (i % 3) as f64 * 30.0,
                h: 40.0 + (i % 2) as f64 * 20.0,
            })
            .collect()
    }

    fn overlap(a: &Rect, b: &Rect) -> bool {
        a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h
    }

    fn check(sizes: &[Size], edges: &[(usize, usize)]) -> Layout {
        let l = layout(sizes, edges);
        assert_eq!(l.nodes.len(), sizes.len(), "every node placed");
        for (i, a) in l.nodes.iter().enumerate() {
            assert!(a.x.is_finite() && a.y.is_finite(), "node {i} placed: {a:?}");
            assert!(
                a.x >= 0.0 && a.x + a.w <= l.width,
                "node {i} inside the width"
            );
            assert!(
                a.y >= 0.0 && a.y + a.h <= l.height,
                "node {i} inside the height"
            );
            for (j, b) in l.nodes.iter().enumerate().skip(i + 1) {
                assert!(!overlap(a, b), "nodes {i} and {j} overlap: {a:?} {b:?}");
            }
        }
        l
    }

    /// The welcome flow's shape: a chain, a branch, a long edge skipping a layer, a join.
    fn flowish() -> (Vec<Size>, Vec<(usize, usize)>) {
        let edges = vec![
            (0, 1),
            (1, 2),
            (1, 3),
            (2, 4),
            (3, 5),
            (5, 4),
            (1, 4),
            (4, 6),
        ];
        (boxes(7), edges)
    }

    #[test]
    fn edges_point_downward_and_nodes_never_overlap() {
        let (sizes, edges) = flowish();
        let l = check(&sizes, &edges);
        for (k, &(a, b)) in edges.iter().enumerate() {
            assert!(l.layers[a] < l.layers[b], "edge {a}->{b} goes down a layer");
            let points = &l.edges[k];
            assert!(points.len() >= 2);
            for pair in points.windows(2) {
                assert!(
                    pair[0].1 <= pair[1].1,
                    "edge {a}->{b} never climbs: {points:?}"
                );
            }
            assert_eq!(
                points[0].1,
                l.nodes[a].y + l.nodes[a].h,
                "leaves its source's bottom"
            );
            assert_eq!(
                points[points.len() - 1].1,
                l.nodes[b].y,
                "enters its target's top"
            );
        }
    }

    #[test]
    fn longest_path_layering() {
        let (sizes, edges) = flowish();
        let l = layout(&sizes, &edges);
        // 4 is below 5, which is below 3: the long edge 1->4 does not lift it.
        assert_eq!(l.layers, vec![0, 1, 2, 2, 4, 3, 5]);
        // The long edge bends through the layers between (two dummy layers, two points each).
        assert_eq!(l.edges[6].len(), 2 + 2 * 2);
    }

    #[test]
    fn a_chain_stays_straight() {
        // A node with one parent sits under it: 0-1-2-3 in a line, with a side branch 1-4-3.
        let l = check(
            &boxes(5)
                .iter()
                .map(|_| Size { w: 100.0, h: 40.0 })
                .collect::<Vec<_>>(),
            &[(0, 1), (1, 2), (2, 3), (1, 4), (4, 3)],
        );
        let centre = |i: usize| l.nodes[i].x + l.nodes[i].w / 2.0;
        assert_eq!(centre(0), centre(1), "{l:?}");
        assert_eq!(centre(3), centre(1), "the join sits under the fork: {l:?}");
        assert!(
            (centre(2) - centre(1)).abs() == (centre(4) - centre(1)).abs(),
            "{l:?}"
        );
    }

    #[test]
    fn deterministic() {
        let (sizes, edges) = flowish();
        assert_eq!(layout(&sizes, &edges), layout(&sizes, &edges));
    }

    #[test]
    fn barycenter_ordering_removes_an_avoidable_crossing() {
        // 0 -> 3, 1 -> 2: in input order the two edges cross; ordered, they do not.
        let l = check(&boxes(4), &[(0, 3), (1, 2)]);
        let left = |i: usize| l.nodes[i].x;
        assert_eq!(left(0) < left(1), left(3) < left(2), "{l:?}");
    }

    #[test]
    fn cycles_disconnected_parts_and_bad_edges_are_total() {
        let l = check(&boxes(6), &[(0, 1), (1, 2), (2, 0), (3, 3), (4, 9), (5, 4)]);
        assert_eq!(
            l.edges[3],
            Vec::<(f64, f64)>::new(),
            "a self edge draws nothing"
        );
        assert_eq!(
            l.edges[4],
            Vec::<(f64, f64)>::new(),
            "an edge to nowhere draws nothing"
        );
        assert!(!l.edges[2].is_empty(), "the back edge is drawn");
        let empty = layout(&[], &[]);
        assert!(empty.nodes.is_empty());
    }

    #[test]
    fn a_wide_fan_out_keeps_its_gaps() {
        let mut edges = Vec::new();
        for i in 1..12 {
            edges.push((0, i));
            edges.push((i, 12));
        }
        let l = check(&boxes(13), &edges);
        assert!(l.layers[1..12].iter().all(|&x| x == 1));
        assert_eq!(l.layers[12], 2);
    }
}

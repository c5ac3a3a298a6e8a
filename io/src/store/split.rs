//! A step over several users' or conversations' keys, split into one call per group of
//! keys (a slot, a master) and put back together in the caller's order. The Redis store
//! runs it per slot on a Redis Cluster (`redis/cluster.rs`); the simulation's sharded store
//! runs it per master, so both split and report outcomes by one rule.

use std::future::Future;

use cim_core::store::StoreUnavailable;
use futures::StreamExt as _;

/// Runs `step` once per group of `groups` (indices into `items`), at most `concurrency`
/// calls at once; `step` returns one output per item it was given, and the outputs come
/// back in `items`' order. Atomic per call only: items of different groups are separate
/// steps. A failed call fails the whole step, unless `unknown` is given: then its items get
/// `unknown(item)` instead, so that one dead master does not fail the users of the others,
/// and the step fails only if every call failed.
pub async fn run_split<'i, I, O, Fut>(
    items: &'i [I],
    groups: Vec<Vec<usize>>,
    step: impl Fn(Vec<&'i I>) -> Fut,
    unknown: Option<impl Fn(&I) -> O>,
    concurrency: usize,
) -> Result<Vec<O>, StoreUnavailable>
where
    Fut: Future<Output = Result<Vec<O>, StoreUnavailable>>,
{
    // Made before anything is awaited, so the future holds no closure over borrowed items
    // (which would make it not provably `Send`).
    let calls: Vec<Fut> = groups
        .iter()
        .map(|group| step(group.iter().map(|&i| &items[i]).collect()))
        .collect();
    let outputs: Vec<Result<Vec<O>, StoreUnavailable>> = futures::stream::iter(calls)
        .buffered(concurrency.max(1))
        .collect()
        .await;
    let mut slots: Vec<Option<O>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    let mut first_error = None;
    let mut answered = 0;
    for (group, output) in groups.iter().zip(outputs) {
        let output = match (output, &unknown) {
            (Ok(output), _) => output,
            (Err(e), Some(unknown)) => {
                first_error.get_or_insert(e);
                for &i in group {
                    slots[i] = Some(unknown(&items[i]));
                }
                continue;
            }
            (Err(e), None) => return Err(e),
        };
        if output.len() != group.len() {
            return Err(StoreUnavailable(
                "store: a split step answered for the wrong number of items".into(),
            ));
        }
        answered += 1;
        for (&i, o) in group.iter().zip(output) {
            slots[i] = Some(o);
        }
    }
    if answered == 0
        && let Some(e) = first_error
    {
        return Err(e);
    }
    slots
        .into_iter()
        .map(|o| o.ok_or_else(|| StoreUnavailable("store: a split step left a gap".into())))
        .collect()
}

/// Indices of `items` grouped by `group_of` each, in group order.
pub fn group_by<I, G: Ord>(items: &[I], group_of: impl Fn(&I) -> G) -> Vec<Vec<usize>> {
    let mut groups: std::collections::BTreeMap<G, Vec<usize>> = Default::default();
    for (i, item) in items.iter().enumerate() {
        groups.entry(group_of(item)).or_default().push(i);
    }
    groups.into_values().collect()
}

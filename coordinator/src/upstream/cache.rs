//! A bounded, single-flight TTL cache for upstream auth decisions.
//!
//! Why: a client that reconnects in a burst (or 100 clients of one user) must not turn into 100
//! requests to coderd. Each key holds either a ready decision with its own expiry (positive and
//! negative decisions get separate TTLs, chosen by the caller) or an in-flight lookup that every
//! concurrent miss waits for, so one upstream request answers them all.
//!
//! This module must never hold its mutex across `.await` (waiters clone a `watch` receiver and
//! wait outside the lock), never grow past its capacity, and never cache an "upstream
//! unavailable" answer (the caller returns `None` as TTL for it). If the leading lookup is
//! dropped (its request was cancelled), waiters retry and one of them becomes the new leader.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::UpstreamMetrics;

enum Slot<V> {
    Ready { value: V, expires: Instant },
    InFlight(watch::Receiver<Option<V>>),
}

/// See the module documentation.
pub struct DecisionCache<K, V> {
    map: Mutex<HashMap<K, Slot<V>>>,
    capacity: usize,
    metrics: Option<UpstreamMetrics>,
}

impl<K, V> std::fmt::Debug for DecisionCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Removes the in-flight marker if the leader is dropped before it finished.
struct LeaderGuard<'a, K: Hash + Eq + Clone, V: Clone> {
    cache: &'a DecisionCache<K, V>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for LeaderGuard<'_, K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            let mut map = self.cache.lock();
            if matches!(map.get(&k), Some(Slot::InFlight(_))) {
                map.remove(&k);
            }
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> DecisionCache<K, V> {
    /// A cache of at most `capacity` keys (at least 1), counting hits/misses in `metrics`.
    pub fn new(capacity: usize, metrics: Option<UpstreamMetrics>) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Slot<V>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, result: &str) {
        if let Some(m) = &self.metrics {
            m.auth_cache.with_label_values(&[result]).inc();
        }
    }

    /// Number of keys held (ready or in flight).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget `key`.
    pub fn invalidate(&self, key: &K) {
        self.lock().remove(key);
    }

    /// The cached value for `key`, or the result of `fetch` (run once for all concurrent callers
    /// of the same key). `ttl(&value)` decides how long the value is kept; `None` = not cached.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: K,
        ttl: impl Fn(&V) -> Option<Duration>,
        fetch: F,
    ) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let mut fetch = Some(fetch);
        loop {
            // Decide under the lock; wait or fetch outside it.
            let step = self.step(&key);
            let mut rx = match step {
                Step::Hit(v) => {
                    self.count("hit");
                    return v;
                }
                Step::Wait(rx) => rx,
                Step::Lead(tx) => {
                    self.count("miss");
                    let Some(f) = fetch.take() else {
                        // Unreachable: a caller that led has returned. Clear our marker.
                        self.lock().remove(&key);
                        continue;
                    };
                    let mut guard = LeaderGuard {
                        cache: self,
                        key: Some(key.clone()),
                    };
                    let value = f().await;
                    guard.key = None;
                    self.store(&key, &value, ttl(&value));
                    let _ = tx.send(Some(value.clone()));
                    return value;
                }
            };
            self.count("coalesced");
            // Wait for the leader's answer (or for it to be dropped: then retry).
            let got = match rx.wait_for(|v| v.is_some()).await {
                Ok(v) => v.clone(),
                Err(_) => None,
            };
            if let Some(v) = got {
                return v;
            }
            // The leader went away without an answer: clear its marker (if still there) and retry.
            self.clear_stale(&key, &rx);
        }
    }

    fn step(&self, key: &K) -> Step<V> {
        let mut map = self.lock();
        let now = Instant::now();
        match map.get(key) {
            Some(Slot::Ready { value, expires }) if *expires > now => Step::Hit(value.clone()),
            Some(Slot::InFlight(rx)) => Step::Wait(rx.clone()),
            _ => {
                let (tx, rx) = watch::channel(None);
                if map.len() >= self.capacity && !map.contains_key(key) {
                    evict(&mut map, now, self.capacity);
                }
                map.insert(key.clone(), Slot::InFlight(rx));
                Step::Lead(tx)
            }
        }
    }

    fn store(&self, key: &K, value: &V, ttl: Option<Duration>) {
        let mut map = self.lock();
        match ttl {
            Some(d) => {
                map.insert(
                    key.clone(),
                    Slot::Ready {
                        value: value.clone(),
                        expires: Instant::now() + d,
                    },
                );
            }
            None => {
                map.remove(key);
            }
        }
    }

    fn clear_stale(&self, key: &K, rx: &watch::Receiver<Option<V>>) {
        let mut map = self.lock();
        if let Some(Slot::InFlight(cur)) = map.get(key) {
            if cur.same_channel(rx) {
                map.remove(key);
            }
        }
    }
}

enum Step<V> {
    Hit(V),
    Wait(watch::Receiver<Option<V>>),
    Lead(watch::Sender<Option<V>>),
}

/// Make room: drop expired entries; if still full, drop ready entries until below capacity.
fn evict<K: Hash + Eq + Clone, V>(map: &mut HashMap<K, Slot<V>>, now: Instant, capacity: usize) {
    map.retain(|_, s| match s {
        Slot::Ready { expires, .. } => *expires > now,
        Slot::InFlight(_) => true,
    });
    if map.len() < capacity {
        return;
    }
    let victims: Vec<K> = map
        .iter()
        .filter(|(_, s)| matches!(s, Slot::Ready { .. }))
        .map(|(k, _)| k.clone())
        .take(map.len() + 1 - capacity)
        .collect();
    for k in victims {
        map.remove(&k);
    }
    // Still full of in-flight lookups: drop an arbitrary one (its waiters retry).
    while map.len() >= capacity {
        let Some(k) = map.keys().next().cloned() else {
            break;
        };
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn single_flight_and_ttl() {
        let cache = Arc::new(DecisionCache::<u32, u32>::new(16, None));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(
                        1,
                        |_| Some(Duration::from_millis(200)),
                        || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            7
                        },
                    )
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Cached.
        let v = cache
            .get_or_fetch(1, |_| Some(Duration::from_millis(200)), || async { 8 })
            .await;
        assert_eq!(v, 7);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let v = cache
            .get_or_fetch(1, |_| Some(Duration::from_millis(200)), || async { 8 })
            .await;
        assert_eq!(v, 8);
    }

    #[tokio::test]
    async fn uncached_and_dropped_leader() {
        let cache = Arc::new(DecisionCache::<u32, u32>::new(16, None));
        let v = cache.get_or_fetch(1, |_| None, || async { 1 }).await;
        assert_eq!(v, 1);
        assert!(cache.is_empty());
        // A leader that is dropped mid-fetch: the waiter takes over.
        let c2 = cache.clone();
        let leader = tokio::spawn(async move {
            c2.get_or_fetch(
                2,
                |_| None,
                || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    1
                },
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c3 = cache.clone();
        let waiter = tokio::spawn(async move {
            c3.get_or_fetch(2, |_| Some(Duration::from_secs(1)), || async { 5 })
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let v = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v, 5);
    }

    #[tokio::test]
    async fn bounded() {
        let cache = DecisionCache::<u32, u32>::new(4, None);
        for k in 0..100 {
            cache
                .get_or_fetch(k, |_| Some(Duration::from_secs(60)), || async move { k })
                .await;
            assert!(cache.len() <= 4);
        }
    }
}

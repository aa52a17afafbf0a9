//! The delivery thread of one registered node: takes batches off the node's inbox, runs them
//! through the filters, holds delayed packets until due, and calls the node's handler.
//!
//! One thread per node (not per pair, not one for all) because it keeps per-pair order by
//! construction (one FIFO inbox, one consumer), lets nodes receive in parallel as real
//! processes do, and a handler stuck on one node stalls only that node. The thread is owned
//! by the node's [`Endpoint`]: it stops when the endpoint is stopped (unregister, shutdown or
//! the network dropped), drops whatever is still queued, and releases the handler.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use flotilla_proto::transport::NodeBatch;
use flotilla_proto::NodeId;

use super::stats::Counters;
use super::{Endpoint, Envelope, FilterSet, Inbound, Shared};
use crate::budget::Charge;
use crate::filter::{Action, Packet, Payload};
use crate::{metric, BatchHandler};

/// Envelopes taken off the inbox per round beyond the first: whatever is already queued is
/// merged into the same delivery, but a flood cannot postpone delivery forever.
const MAX_DRAIN: usize = 1024;

/// A packet waiting for its due time.
struct Scheduled {
    due: Instant,
    /// Tie-breaker: packets due at the same instant go out in the order they were scheduled.
    seq: u64,
    packet: Packet,
    charge: Charge,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// One filtered copy of a packet on its way to the schedule.
struct Routed {
    packet: Packet,
    charge: Charge,
    delay: Duration,
    /// Set by a reorder filter: the copy ignores (and does not raise) its pair's order mark.
    unordered: bool,
}

/// What one round hands to the handler: one batch per sender.
struct Outgoing {
    from: NodeId,
    batch: NodeBatch,
    charges: Vec<Charge>,
}

impl Outgoing {
    fn hold(&mut self, charge: Charge) {
        // Usually every charge of a sender is on the same queue; merge to keep this short.
        if let Some(last) = self.charges.last_mut() {
            if let Some(other) = last.absorb(charge) {
                self.charges.push(other);
            }
        } else {
            self.charges.push(charge);
        }
    }

    fn len(&self) -> u64 {
        (self.batch.messages.len() + self.batch.heartbeats.len()) as u64
    }
}

pub(super) struct Delivery {
    node: NodeId,
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    handler: Arc<dyn BatchHandler>,
    pending: BinaryHeap<Reverse<Scheduled>>,
    /// Per sender, the due time of its latest in-order packet: a later in-order packet from
    /// the same sender is never due before it. This is what keeps a removed delay filter, or
    /// a delay on one packet only, from reordering a pair.
    in_order_until: HashMap<NodeId, Instant>,
    next_seq: u64,
    out: Vec<Outgoing>,
    /// Barriers taken in this round, signalled once its batches went to the handler.
    barriers: Vec<Sender<()>>,
}

impl Delivery {
    pub(super) fn new(
        shared: Arc<Shared>,
        endpoint: Arc<Endpoint>,
        handler: Arc<dyn BatchHandler>,
    ) -> Self {
        Self {
            node: endpoint.node,
            shared,
            endpoint,
            handler,
            pending: BinaryHeap::new(),
            in_order_until: HashMap::new(),
            next_seq: 0,
            out: Vec::new(),
            barriers: Vec::new(),
        }
    }

    /// The thread's body; returns when the endpoint is stopped.
    pub(super) fn run(mut self, inbox: Receiver<Inbound>) {
        loop {
            let first = match self.pending.peek() {
                None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(Reverse(next)) => inbox.recv_deadline(next.due),
            };
            let mut stop = false;
            // The filter set is read after the first receive, so a filter installed before a
            // send returned always sees what that send queued.
            match first {
                Ok(Inbound::Batch(env)) => {
                    let filters = self.shared.filters();
                    self.intake(env, &filters);
                    stop = self.drain(&inbox, &filters);
                }
                Ok(Inbound::Barrier(done)) => {
                    self.barriers.push(done);
                    let filters = self.shared.filters();
                    stop = self.drain(&inbox, &filters);
                }
                Ok(Inbound::Stop) | Err(RecvTimeoutError::Disconnected) => stop = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if stop || self.endpoint.is_stopped() {
                self.discard(&inbox);
                self.shared.counters.notify();
                return;
            }
            self.release_due();
            self.deliver();
            for done in self.barriers.drain(..) {
                let _ = done.send(());
            }
            // Once per round, not per counter: filters count drops and delays at intake, and
            // tests wait on those too.
            self.shared.counters.notify();
        }
    }

    /// Takes what is already queued without waiting; returns whether a stop was seen.
    fn drain(&mut self, inbox: &Receiver<Inbound>, filters: &FilterSet) -> bool {
        for _ in 0..MAX_DRAIN {
            match inbox.try_recv() {
                Ok(Inbound::Batch(env)) => self.intake(env, filters),
                Ok(Inbound::Barrier(done)) => self.barriers.push(done),
                Ok(Inbound::Stop) => return true,
                Err(_) => return false,
            }
        }
        false
    }

    fn intake(&mut self, env: Envelope, filters: &FilterSet) {
        // Packets a hold filter kept went through the filters when they were sent.
        let unfiltered = env.released || filters.is_empty();
        if unfiltered && self.pending.is_empty() {
            // Fast path: nothing to filter and nothing held that this batch could overtake.
            let out = self.outgoing(env.from);
            out.batch.messages.extend(env.batch.messages);
            out.batch.heartbeats.extend(env.batch.heartbeats);
            out.hold(env.charge);
            return;
        }
        let now = Instant::now();
        let Envelope {
            from,
            batch,
            mut charge,
            ..
        } = env;
        let payloads = (batch.messages.into_iter().map(Payload::Message))
            .chain(batch.heartbeats.into_iter().map(Payload::Heartbeat));
        for payload in payloads {
            let charge = charge.split_off(payload.encoded_len());
            let packet = Packet {
                from,
                to: self.node,
                payload,
            };
            if unfiltered {
                let routed = Routed {
                    packet,
                    charge,
                    delay: Duration::ZERO,
                    unordered: false,
                };
                self.schedule(routed, now);
                continue;
            }
            for routed in self.filter(packet, charge, filters) {
                self.schedule(routed, now);
            }
        }
        // What is left of `charge` (the batch's own framing) is released here.
    }

    /// Runs one packet through every filter in installation order. Copies made by a
    /// duplicate filter go through the filters after it, not through it again.
    fn filter(&self, packet: Packet, charge: Charge, filters: &FilterSet) -> Vec<Routed> {
        let counters = &self.shared.counters;
        let mut copies = vec![Routed {
            packet,
            charge,
            delay: Duration::ZERO,
            unordered: false,
        }];
        for (_, f) in filters.iter() {
            let mut i = 0;
            while i < copies.len() {
                match f.apply(&copies[i].packet) {
                    Action::Pass => i += 1,
                    Action::Drop => {
                        copies.remove(i);
                        Counters::add(counters.dropped_by(f.kind()), 1);
                        metric::dropped(f.kind().as_str(), 1);
                    }
                    // The filter kept its own copy; this one goes, releasing its charge.
                    Action::Hold => {
                        copies.remove(i);
                        Counters::add(&counters.held, 1);
                    }
                    Action::Delay(d) => {
                        copies[i].delay += d;
                        Counters::add(&counters.delayed, 1);
                        i += 1;
                    }
                    Action::Reorder(d) => {
                        copies[i].delay += d;
                        copies[i].unordered = true;
                        Counters::add(&counters.reordered, 1);
                        i += 1;
                    }
                    Action::Duplicate(n) => {
                        let original = &copies[i];
                        let extra: Vec<Routed> = (0..n)
                            .map(|_| Routed {
                                packet: original.packet.clone(),
                                charge: original
                                    .charge
                                    .extra(original.packet.payload.encoded_len()),
                                delay: original.delay,
                                unordered: original.unordered,
                            })
                            .collect();
                        for (k, copy) in extra.into_iter().enumerate() {
                            copies.insert(i + 1 + k, copy);
                        }
                        Counters::add(&counters.duplicated, u64::from(n));
                        i += 1 + n as usize;
                    }
                }
            }
        }
        copies
    }

    fn schedule(&mut self, routed: Routed, now: Instant) {
        let mut due = now + routed.delay;
        if !routed.unordered {
            let mark = self.in_order_until.entry(routed.packet.from).or_insert(due);
            due = due.max(*mark);
            *mark = due;
        }
        self.next_seq += 1;
        self.pending.push(Reverse(Scheduled {
            due,
            seq: self.next_seq,
            packet: routed.packet,
            charge: routed.charge,
        }));
    }

    fn release_due(&mut self) {
        let now = Instant::now();
        while self.pending.peek().is_some_and(|Reverse(s)| s.due <= now) {
            let Reverse(s) = self.pending.pop().expect("peeked");
            let out = self.outgoing(s.packet.from);
            match s.packet.payload {
                Payload::Message(m) => out.batch.messages.push(m),
                Payload::Heartbeat(h) => out.batch.heartbeats.push(h),
            }
            out.hold(s.charge);
        }
        if self.pending.is_empty() {
            // Every mark is a due time already passed: none can hold anything back any more.
            self.in_order_until.clear();
        }
    }

    fn outgoing(&mut self, from: NodeId) -> &mut Outgoing {
        let i = match self.out.iter().position(|o| o.from == from) {
            Some(i) => i,
            None => {
                self.out.push(Outgoing {
                    from,
                    batch: NodeBatch {
                        from_node: from.0,
                        to_node: self.node.0,
                        ..Default::default()
                    },
                    charges: Vec::new(),
                });
                self.out.len() - 1
            }
        };
        &mut self.out[i]
    }

    fn deliver(&mut self) {
        let counters = &self.shared.counters;
        for out in self.out.drain(..) {
            if self.endpoint.is_stopped() {
                // Unregistered mid-round (possibly by the handler itself): deliver nothing
                // more, so that no handler runs after `unregister` returns.
                Counters::add(&counters.dropped_unreachable, out.len());
                metric::dropped("unreachable", out.len());
                continue;
            }
            let (messages, heartbeats) = (out.batch.messages.len(), out.batch.heartbeats.len());
            self.handler.on_batch(out.batch);
            // Counted after the handler returns, so that a test that sees the count also sees
            // whatever the handler recorded. The charges go only now: bytes in a handler's
            // hands are still "queued" for back-pressure.
            drop(out.charges);
            Counters::add(&counters.delivered_batches, 1);
            Counters::add(&counters.delivered_messages, messages as u64);
            Counters::add(&counters.delivered_heartbeats, heartbeats as u64);
            metric::delivered(messages, heartbeats);
        }
    }

    /// Drops everything still queued for a stopped node, counting it.
    fn discard(&mut self, inbox: &Receiver<Inbound>) {
        let mut lost: u64 = self.pending.drain().map(|_| 1).sum();
        lost += self.out.drain(..).map(|o| o.len()).sum::<u64>();
        while let Ok(msg) = inbox.try_recv() {
            if let Inbound::Batch(env) = msg {
                lost += (env.batch.messages.len() + env.batch.heartbeats.len()) as u64;
            }
        }
        let counters = &self.shared.counters;
        Counters::add(&counters.dropped_unreachable, lost);
        if lost > 0 {
            metric::dropped("unreachable", lost);
        }
    }
}

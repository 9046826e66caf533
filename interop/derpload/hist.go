package main

import "math/bits"

// hist is a log-linear latency histogram in nanoseconds: 64 linear sub-buckets per power of
// two, so every recorded value is kept to within 1/64 (~1.6%) of itself, in fixed memory (no
// allocation per packet, which would add garbage-collector work to the client's CPU figure).
type hist struct {
	counts [64 * 64]uint64
	n      uint64
	max    uint64
}

const subBits = 6

func bucketOf(v uint64) int {
	if v < 1<<subBits {
		return int(v)
	}
	e := bits.Len64(v) - subBits // ≥ 1
	return e<<subBits | int(v>>(e-1)&(1<<subBits-1))
}

// lowerBound is the smallest value that falls in bucket i.
func lowerBound(i int) uint64 {
	e := i >> subBits
	if e == 0 {
		return uint64(i)
	}
	return (1<<subBits | uint64(i&(1<<subBits-1))) << (e - 1)
}

func (h *hist) record(v uint64) {
	h.counts[bucketOf(v)]++
	h.n++
	if v > h.max {
		h.max = v
	}
}

func (h *hist) merge(o *hist) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	if o.max > h.max {
		h.max = o.max
	}
}

// quantile returns the lower bound of the bucket holding the q-quantile (0 if empty).
func (h *hist) quantile(q float64) uint64 {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q * float64(h.n))
	if rank >= h.n {
		rank = h.n - 1
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen > rank {
			return lowerBound(i)
		}
	}
	return h.max
}

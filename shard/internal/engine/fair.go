package engine

// fairQueue holds waiting sequences in one FIFO per adapter and hands them out round-robin over
// adapters, so a flood of requests for one adapter waits behind one turn per other adapter instead
// of in front of everyone. Sequences preempted to free KV memory go back to the head of their
// adapter's FIFO.
type fairQueue struct {
	fifos map[string][]*sequence
	ring  []string // adapters with waiting sequences, in rotation order
	next  int      // ring index whose turn it is
	n     int
}

func newFairQueue() *fairQueue { return &fairQueue{fifos: map[string][]*sequence{}} }

func (q *fairQueue) len() int { return q.n }

func (q *fairQueue) add(s *sequence, front bool) {
	id := s.r.AdapterID
	f, ok := q.fifos[id]
	if !ok {
		// A newly waiting adapter takes its turn just before the current one comes round again.
		q.ring = append(q.ring, "")
		copy(q.ring[q.next+1:], q.ring[q.next:])
		q.ring[q.next] = id
		q.next++
		if q.next >= len(q.ring) {
			q.next = 0
		}
	}
	if front {
		f = append([]*sequence{s}, f...)
	} else {
		f = append(f, s)
	}
	q.fifos[id] = f
	q.n++
}

// peek returns the sequence whose turn it is.
func (q *fairQueue) peek() *sequence {
	if q.n == 0 {
		return nil
	}
	return q.fifos[q.ring[q.next]][0]
}

// pop removes the sequence peek returned and passes the turn to the next adapter.
func (q *fairQueue) pop() *sequence {
	id := q.ring[q.next]
	f := q.fifos[id]
	s := f[0]
	f[0] = nil
	q.n--
	if len(f) == 1 {
		delete(q.fifos, id)
		q.ring = append(q.ring[:q.next], q.ring[q.next+1:]...)
	} else {
		q.fifos[id] = f[1:]
		q.next++
	}
	if q.next >= len(q.ring) {
		q.next = 0
	}
	return s
}

// remove takes out every sequence for which drop reports true and returns them.
func (q *fairQueue) remove(drop func(*sequence) bool) []*sequence {
	var out []*sequence
	cur := ""
	if len(q.ring) > 0 {
		cur = q.ring[q.next]
	}
	ring := q.ring[:0]
	for _, id := range q.ring {
		kept := q.fifos[id][:0]
		for _, s := range q.fifos[id] {
			if drop(s) {
				out = append(out, s)
				q.n--
			} else {
				kept = append(kept, s)
			}
		}
		if len(kept) == 0 {
			delete(q.fifos, id)
			continue
		}
		q.fifos[id] = kept
		ring = append(ring, id)
	}
	clear(q.ring[len(ring):])
	q.ring = ring
	q.next = 0
	for i, id := range q.ring {
		if id == cur {
			q.next = i
		}
	}
	return out
}

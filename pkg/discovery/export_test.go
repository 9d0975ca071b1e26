package discovery

// Abandon stops renewing and publishing without removing anything, as a crashed shard would; Consul
// then expires the session (deleting the residency key) and the failing health check removes the
// instance.
func (r *Registration) Abandon() {
	r.stop()
	<-r.done
}

"""Computing answers: the local engine and its decode step, the upstream engine, the scheduler and its policy."""

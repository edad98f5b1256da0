"""memfed.node: the model host, cube store, scheduler, lifecycle, editing and conversion."""

"""One request's life: validate, admit, call upstream, relay, settle."""

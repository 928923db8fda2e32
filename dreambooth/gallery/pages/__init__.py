"""One module per page: each turns the data of its page into HTML (pure)."""

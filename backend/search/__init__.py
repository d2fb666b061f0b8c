"""Region search: an index of every region the product embeds, vector stores behind one interface, queries."""

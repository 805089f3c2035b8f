"""NBD wire protocol (fixed newstyle) and the asyncio server speaking it."""

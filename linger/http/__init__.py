"""The HTTP layer: handlers, request parsing, middleware and the route table; the only
package that imports aiohttp."""

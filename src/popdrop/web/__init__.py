"""The HTTP kit every router uses: auth, params, context, the operator page kit, forms,
streaming, templating, security headers, the shared templates and static files. The app
itself is assembled above every domain, in `popdrop.app`."""

# syntax=docker/dockerfile:1
#
# The dev IdP and demo API of deploy/dev-idp (dev and test only), for
# deploy/docker-compose.yml. Build context: the repository root.
#
#   docker build -f deploy/dev-idp.Dockerfile -t m2m-proxy-dev-idp:local .
#
# oidc-provider 9 asks for Node 22 LTS; Node 20 (what `make run` needs at least) has
# reached its end of life, so the image uses 22. NODE_IMAGE=node:20-slim works too.
ARG NODE_IMAGE=node:22-slim
FROM ${NODE_IMAGE}
WORKDIR /app
COPY deploy/dev-idp/package.json deploy/dev-idp/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error
COPY deploy/dev-idp/idp.js deploy/dev-idp/demo-api.js ./
# the image's "node" user
USER 1000:1000
CMD ["node", "idp.js"]

# Static keyfs image (no simulator, no libc): docker build -t keyfs .
# Without Docker, `make image` builds the same image as an OCI tarball.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /keyfs ./cmd/keyfs

FROM scratch
COPY --from=build /keyfs /keyfs
ENTRYPOINT ["/keyfs"]

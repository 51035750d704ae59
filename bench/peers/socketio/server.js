"use strict";
// Socket.IO peer for holdfast-bench.
// Usage: node server.js <port>
// Events: "join" (rooms: string[], ack) -> joins rooms, acks "ok";
//         "publish" (channel: string, data: object) -> emits "m" with data to the room.
const http = require("http");
const { Server } = require("socket.io");

const port = Number.parseInt(process.argv[2], 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  process.stderr.write("usage: node server.js <port>\n");
  process.exit(2);
}

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
});

io.on("connection", (socket) => {
  socket.on("join", (rooms, ack) => {
    socket.join(rooms);
    if (typeof ack === "function") ack("ok");
  });
  socket.on("publish", (channel, data) => {
    io.to(channel).emit("m", data);
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  process.stderr.write(`socketio peer listening on 127.0.0.1:${port}\n`);
});

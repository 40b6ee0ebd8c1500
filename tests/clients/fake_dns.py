"""A stand-in upstream resolver for the agent's `recursors`: answers every
A question, over UDP and TCP, with 192.0.2.44 (TEST-NET-1), and prints each
name it is asked, one per line, so that a test can see what reached it.

Usage: fake_dns.py HOST PORT. Python's standard library only.
"""
import socket
import struct
import sys
import threading

HOST, PORT = sys.argv[1], int(sys.argv[2])
ANSWER = bytes([192, 0, 2, 44])


def question_end(msg):
    i = 12
    while msg[i] != 0:
        i += 1 + msg[i]
    return i + 5  # the root label, QTYPE and QCLASS


def qname(msg):
    labels, i = [], 12
    while msg[i] != 0:
        labels.append(msg[i + 1 : i + 1 + msg[i]].decode("ascii", "replace"))
        i += 1 + msg[i]
    return ".".join(labels)


def answer(msg):
    end = question_end(msg)
    print(qname(msg), flush=True)
    flags = 0x8180 | (msg[2] & 0x01) << 8  # response, RD echoed, RA, NOERROR
    header = msg[:2] + struct.pack(">HHHHH", flags, 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + ANSWER
    return header + msg[12:end] + record


def serve_tcp():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, PORT))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        with conn:
            length = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
            reply = answer(conn.recv(length, socket.MSG_WAITALL))
            conn.sendall(struct.pack(">H", len(reply)) + reply)


udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((HOST, PORT))
threading.Thread(target=serve_tcp, daemon=True).start()
print("ready", flush=True)
while True:
    data, peer = udp.recvfrom(4096)
    udp.sendto(answer(data), peer)

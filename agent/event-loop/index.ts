export { LoopPoll } from './loop-poll.js';
